"""What a training run leaves: the rows as a PEFT adapter or a checkpoint (:mod:`.checkpoint`, the adapter
format in :mod:`.adapter`), and the rows and their tokens written into a copy of the model's GGUF (:mod:`.gguf`)."""
