# dev/isa.mk (included by the Makefile): `make test-isa` runs the test suite once more for each SIMD
# path of lib/fast.h and lib/bf16.h that `make test` did not take on this CPU. The paths (x86-64):
#   avx512bf16  16-wide GEMM, 16x16 transposing packs, bf16 dot products (vdpbf16ps): Zen 4/5, Sapphire Rapids
#   avx512      the same GEMM; -Q bf16 widens its weights while packing: Skylake-X, Ice Lake
#   avx2        8-wide GEMM, 8x8 transposing packs: Zen 1-3, Haswell and later
#   sse         4-wide vectors and no intrinsics at all (the code that ARM's NEON builds also take)
# A path this CPU can run is built for it (-march=native with the sets above it switched off, or plain
# x86-64 for sse). An AVX-512 path on a CPU without AVX-512 is built against SIMDe's portable AVX-512
# (Debian libsimde-dev) through dev/avx512_emulated/immintrin.h: slower, but the same source (and the
# same numbers, but for vdpbf16ps: SIMDe adds its two products one at a time and keeps denormals, both
# inside the tests' bounds), so a machine of any generation checks all four. The binary suite is left out: it runs
# the trainer that `make test` built, which the path does not change. About 2 minutes of compiling and
# 15 s of tests per path on a 2-core Zen 1; `make -j2 test-isa` compiles two at a time.
ISA_BUILD := $(BUILD)/isa
ISA_CPU := $(shell grep -m1 '^flags' /proc/cpuinfo 2>/dev/null)
ISA_CPU_HAS = $(filter $(1),$(ISA_CPU))
# the path `make test` took: the compiler's own macros under the reference flags
ISA_MACROS := $(shell echo | $(CXX) $(CXXFLAGS) -dM -E -x c++ - 2>/dev/null | grep -oE '__(AVX512BF16|AVX512F|AVX|x86_64)__')
ISA_NATIVE := $(if $(filter __AVX512BF16__,$(ISA_MACROS)),avx512bf16,$(if $(filter __AVX512F__,$(ISA_MACROS)),avx512,$(if $(filter __AVX__,$(ISA_MACROS)),avx2,sse)))
# every path but that one, on x86-64 (the avx2 path only where the CPU runs AVX2: only AVX-512 is emulated)
ISA_PATHS := $(if $(filter __x86_64__,$(ISA_MACROS)),$(filter-out $(ISA_NATIVE) $(if $(call ISA_CPU_HAS,avx2),,avx2),avx512bf16 avx512 avx2 sse))
# the reference flags without -march, then each path's own
ISA_BASE := $(filter-out -march=%,$(CXXFLAGS)) -Wno-psabi
ISA_EMULATED := -march=$(if $(call ISA_CPU_HAS,avx2),x86-64-v3,x86-64) -I dev/avx512_emulated
ISA_FLAGS_avx512bf16 := $(if $(call ISA_CPU_HAS,avx512_bf16),-march=native,$(ISA_EMULATED) -D__AVX512F__ -D__AVX512BF16__)
ISA_FLAGS_avx512 := $(if $(call ISA_CPU_HAS,avx512f),-march=native -mno-avx512bf16,$(ISA_EMULATED) -D__AVX512F__)
ISA_FLAGS_avx2 := $(if $(call ISA_CPU_HAS,avx512f),-march=native -mno-avx512f,-march=x86-64-v3)
ISA_FLAGS_sse := -march=x86-64
ISA_EMULATES = $(findstring avx512_emulated,$(ISA_FLAGS_$(1)))

$(ISA_BUILD)/%/test_lora: $(TEST_SOURCES) $(PRODUCT_SOURCES) $(wildcard dev/fuzz/*.h) dev/avx512_emulated/immintrin.h
	@if [ -n "$(call ISA_EMULATES,$*)" ] && [ ! -f /usr/include/simde/x86/avx512.h ]; then \
	    echo "Error: make test-isa: the $* path on this CPU (no $(if $(filter avx512bf16,$*),AVX512_BF16,AVX-512)) is built against SIMDe, and /usr/include/simde/x86/avx512.h is missing"; \
	    echo "---> HINT: apt-get install libsimde-dev"; exit 1; fi
	@mkdir -p $(@D)
	$(CXX) $(ISA_BASE) $(ISA_FLAGS_$*) $(TEST_SOURCES) $(LDFLAGS) $(LDLIBS) -o $@

# one run per path, its log beside the binary: the whole log when a check fails, else the summary. The
# log must also name the bf16 matmul the path was built for (vdpbf16ps with AVX512_BF16, otherwise the
# widened GEMM), so a build that quietly took another path fails too.
ISA_BF16_avx512bf16 := vdpbf16ps
ISA_BF16_avx512 := widened
ISA_BF16_avx2 := widened
ISA_BF16_sse := widened
test-isa-%: $(ISA_BUILD)/%/test_lora
	@echo "== test-isa: the $* path ($(if $(call ISA_EMULATES,$*),AVX-512 emulated by SIMDe,native)): ./$< -tse=binary =="
	@./$< -tse=binary > $(<D)/test.log 2>&1 || { cat $(<D)/test.log; echo "test-isa: the $* path failed (log: $(<D)/test.log)"; exit 1; }
	@grep -q "bf16 matmul path of this build: .*$(ISA_BF16_$*)" $(<D)/test.log || { \
	    echo "Error: test-isa: the $* build's log does not name the $(ISA_BF16_$*) bf16 matmul (log: $(<D)/test.log)"; \
	    echo "---> HINT: check the flags ISA_FLAGS_$* in dev/isa.mk against the #if lines of lib/bf16.h"; exit 1; }
	@tail -n 3 $(<D)/test.log

test-isa: $(addprefix test-isa-,$(ISA_PATHS))
	@echo "test-isa: make test takes the $(if $(filter __x86_64__,$(ISA_MACROS)),$(ISA_NATIVE) path,path of a CPU that is not x86-64: nothing to add); passed: $(or $(ISA_PATHS),none)"

# (the test-isa-<path> targets are never files, but cannot be .PHONY: make skips pattern rules for those)
.PHONY: test-isa
.PRECIOUS: $(ISA_BUILD)/%/test_lora # kept between runs (make would delete them as intermediate files)
