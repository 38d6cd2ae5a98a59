"""Bridges to other training stacks. `hf_trainer`: a Hugging Face `Trainer` drives `unlearn()`."""
