# dev/asan.mk (included by the Makefile): `make asan` builds the trainer and the test binary with
# AddressSanitizer + UndefinedBehaviorSanitizer and runs the whole test suite under them. Any
# out-of-bounds access, use-after-free, leak or undefined behaviour (signed overflow, misaligned load,
# bad shift) aborts the run with a report, so CI fails. -O1 keeps it fast enough; OpenMP stays on
# (it works under ASan with gcc's libgomp), so the threaded kernels are checked too.
ASAN_BUILD := build/asan
ASAN_FLAGS := -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all
# the reference flags minus the optimisation level, plus the sanitizers
ASAN_CXXFLAGS = $(filter-out -O%,$(CXXFLAGS)) $(ASAN_FLAGS)
# max_allocation_size_mb: a reader that sizes a buffer from an unchecked header fails loudly (the same
# 4 GB cap the reader mutation tests set with RLIMIT_DATA outside ASan)
ASAN_ENV := ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:strict_string_checks=1:max_allocation_size_mb=4096:allocator_may_return_null=0 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1

.PHONY: asan
$(ASAN_BUILD)/train_gpt2_lora: $(PRODUCT_SOURCES)
	@mkdir -p $(ASAN_BUILD)
	$(CXX) $(ASAN_CXXFLAGS) $< $(LDFLAGS) -fsanitize=address,undefined $(LDLIBS) -o $@

$(ASAN_BUILD)/test_lora: $(TEST_SOURCES) $(PRODUCT_SOURCES) $(wildcard dev/fuzz/*.h)
	@mkdir -p $(ASAN_BUILD)
	$(CXX) $(ASAN_CXXFLAGS) $(TEST_SOURCES) $(LDFLAGS) -fsanitize=address,undefined $(LDLIBS) -o $@

# the test binary runs the trainer binary too: point it at the sanitized build
asan: $(ASAN_BUILD)/test_lora $(ASAN_BUILD)/train_gpt2_lora
	$(ASAN_ENV) TRAIN_BIN=$(ASAN_BUILD)/train_gpt2_lora ./$(ASAN_BUILD)/test_lora
