# PyTorch reference twin (dev/train_gpt2_lora.py): fixtures for the parity tests and the torch benchmark.
# Included by the top-level Makefile. Python is never needed by build/run/test: the tiny fixture is committed.
PYTHON ?= /usr/bin/python3

# regenerate the committed tiny fixture (deterministic: fixed seeds, same bytes on this machine)
twin-fixture:
	$(PYTHON) dev/train_gpt2_lora.py fixture --out dev/fixtures

# GPT-2 124M-shaped random-weight fixture into data/ (gitignored; ~500 MB, a few minutes on 2 cores)
twin-fixture124m:
	$(PYTHON) dev/train_gpt2_lora.py fixture124m --out data

.PHONY: twin-fixture twin-fixture124m
