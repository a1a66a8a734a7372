"""How a patched model meets each framework: Hugging Face transformers' training forward and TRL's fused head
(:mod:`.huggingface`), PEFT's trainable tokens (:mod:`.peft_tokens`), gemma_pytorch's layout
(:mod:`.gemma_pytorch`) and a ``transformers.TrainerCallback`` (:mod:`.trainer_callback`)."""
