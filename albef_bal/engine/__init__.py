"""Training machinery: distributed set-up, the DeepSpeed engine, the optimizer and its
schedule, checkpoints, logging, and the training loop shared by pretraining and
retrieval fine-tuning."""
