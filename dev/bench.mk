# `make bench`: step benchmarks of LoRA vs full fine-tuning on a GPT-2 124M-shaped random
# checkpoint and on a small one (L=4, C=256, NH=4), the PyTorch twin's step time when /usr/bin/python3
# has torch, and our matmul kernels vs OpenBLAS sgemm. dev/bench.sh does the work and prints ratios.
# Included by the top-level Makefile, which defines CXX, CXXFLAGS, LDFLAGS, LDLIBS and BUILD.
# OpenBLAS is linked into bench_matmul only (a dev comparison), never into the trainer or the tests.

$(BUILD)/bench_step: dev/bench_step.cpp $(PRODUCT_SOURCES)
	@mkdir -p $(BUILD)
	$(CXX) $(CXXFLAGS) $< $(LDFLAGS) $(LDLIBS) -o $@

$(BUILD)/bench_matmul: dev/bench_matmul.cpp $(PRODUCT_SOURCES)
	@mkdir -p $(BUILD)
	$(CXX) $(CXXFLAGS) $< $(LDFLAGS) $(LDLIBS) -lopenblas -o $@

bench: $(BUILD)/bench_step $(BUILD)/bench_matmul
	BENCH_STEP=$(BUILD)/bench_step BENCH_MATMUL=$(BUILD)/bench_matmul bash dev/bench.sh

# `make tune`: other K slices for our GEMMs tried side by side on this CPU (dev/tune_gemm.py)
tune:
	CXX="$(CXX)" CXXFLAGS="$(CXXFLAGS)" LDFLAGS="$(LDFLAGS)" python3 dev/tune_gemm.py

.PHONY: bench tune
