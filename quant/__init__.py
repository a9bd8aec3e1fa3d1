"""Ternary weight quantization (FP, TWN, TTQ, ADMM) for LeNet-5 on MNIST: all the logic behind the scripts."""
