"""The device agent: trains LoRA on local text and answers the coordinator's Flower messages."""
