# make compare: every adaptation method (full, L2-SP, freezing, adapters, prefix, LoRA over ranks and
# targets) from the same base on tinyshakespeare -> dev/results/compare.md and compare_val_loss.png
.PHONY: compare
compare:
	dev/compare.sh
