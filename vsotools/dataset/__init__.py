"""Step 2: the dataset folder's contract and the filter that labels and splits it."""
