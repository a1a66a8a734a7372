"""The main job (``reserved-kernels demo``, ``scripts/demo.sh``): give new terms a meaning in a pretrained Gemma by
training only their rows. :mod:`.job` runs it, :mod:`.stories` holds each story's terms and text, :mod:`.training`
its training loop and measurements, :mod:`.report` its closing lines and plot. Nothing is imported here, so the
command line's parser reads the stories without importing torch."""
