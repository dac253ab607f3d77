"""Training on one process or many (torchrun): the loop, its steps and its runtime."""
