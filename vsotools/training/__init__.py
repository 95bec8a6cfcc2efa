"""Step 4: the networks, the streaming loader, training, evaluation and prediction."""
