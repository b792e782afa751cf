# dev/fuzz.mk (included by the Makefile): `make fuzz` builds one libFuzzer target per file reader
# (dev/fuzz/fuzz_*.cpp, clang with -fsanitize=fuzzer,address,undefined) and runs each for FUZZ_SECONDS,
# starting from valid seed files. A crash, leak, sanitizer report or an error without a HINT stops
# the target and leaves the input in build/fuzz/crash-<target>-*; the corpus grows in build/fuzz/corpus.
FUZZ_CXX ?= clang++
FUZZ_SECONDS ?= 60
FUZZ_DIR := build/fuzz
FUZZ_TARGETS := checkpoint tokens tokenizer encoder_json vocab_bpe adapter safetensors json peft_config
FUZZ_CXXFLAGS := -std=c++17 -O1 -g -fno-omit-frame-pointer -Wno-unknown-pragmas -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all
FUZZ_DEPS := $(PRODUCT_SOURCES) dev/fuzz/fuzz_files.h

.PHONY: fuzz fuzz-build
$(FUZZ_DIR)/fuzz_%: dev/fuzz/fuzz_%.cpp $(FUZZ_DEPS)
	@mkdir -p $(FUZZ_DIR)
	$(FUZZ_CXX) $(FUZZ_CXXFLAGS) $< -o $@

$(FUZZ_DIR)/fuzz_seeds: dev/fuzz/fuzz_seeds.cpp $(FUZZ_DEPS)
	@mkdir -p $(FUZZ_DIR)
	$(CXX) -std=c++17 -O1 -Wno-unknown-pragmas $< -o $@

fuzz-build: $(addprefix $(FUZZ_DIR)/fuzz_,$(FUZZ_TARGETS) seeds)

fuzz: fuzz-build
	./$(FUZZ_DIR)/fuzz_seeds $(FUZZ_DIR)/corpus
	@for t in $(FUZZ_TARGETS); do \
	  echo "== fuzz $$t ($(FUZZ_SECONDS) s) =="; \
	  ./$(FUZZ_DIR)/fuzz_$$t -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 \
	    -artifact_prefix=$(FUZZ_DIR)/crash-$$t- $(FUZZ_DIR)/corpus/$$t > $(FUZZ_DIR)/$$t.log 2>&1; rc=$$?; \
	  grep -E "DONE|stat::number_of_executed_units|ERROR|SUMMARY|Test unit written" $(FUZZ_DIR)/$$t.log; \
	  test $$rc -eq 0 || { echo "fuzz $$t failed: see $(FUZZ_DIR)/$$t.log"; exit 1; }; \
	done
