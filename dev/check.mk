# make check-llamacpp / make check-peft: our exported adapters loaded by the real tools (llama.cpp via the
# npm package node-llama-cpp; Hugging Face PEFT in a Python virtual environment), each installed into
# build/check/ on first use. Not part of make test or .ci/run. Included by the top-level Makefile.

# the small tools that print our side of each comparison (dev/check/greedy.cpp, dev/check/logits.cpp)
build/check/%: dev/check/%.cpp $(PRODUCT_SOURCES)
	@mkdir -p $(@D)
	$(CXX) $(CXXFLAGS) $< $(LDFLAGS) $(LDLIBS) -o $@

check-llamacpp: train_gpt2_lora build/check/greedy
	bash dev/check/check_llamacpp.sh

.PHONY: check-llamacpp

check-peft: train_gpt2_lora build/check/logits
	bash dev/check/check_peft.sh

.PHONY: check-peft
