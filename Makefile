# train_gpt2_lora: `make` builds the trainer, `make test` builds and runs the test binary.
CXX ?= g++
CXXFLAGS ?= -O3 -std=c++17 -Wall -Wextra -Wno-unused-parameter -Wno-unused-function
LDFLAGS ?=
LDLIBS ?= -lm

# -march=native only where the compiler takes it (and no fast-math flags of any kind: this is a reference build)
ifneq ($(shell echo 'int main(){}' | $(CXX) -march=native -x c++ - -o /dev/null 2>/dev/null && echo ok),)
  CXXFLAGS += -march=native
endif

# OpenMP: on when the compiler supports it, off with NO_OMP=1
ifeq ($(NO_OMP), 1)
  $(info ✗ OpenMP off (NO_OMP=1))
  CXXFLAGS += -Wno-unknown-pragmas
else ifneq ($(shell echo | $(CXX) -fopenmp -x c++ -E - >/dev/null 2>&1 && echo ok),)
  $(info ✓ OpenMP found)
  CXXFLAGS += -fopenmp
  LDFLAGS += -fopenmp
else
  $(info ✗ OpenMP not found: building single-threaded)
  CXXFLAGS += -Wno-unknown-pragmas
endif

# MPI: the trainer is built with mpicxx -DUSE_MPI (data parallel under mpirun) when found, off with NO_MPI=1
ifeq ($(NO_MPI), 1)
  $(info ✗ MPI off (NO_MPI=1))
else ifneq ($(shell command -v mpicxx 2>/dev/null),)
  $(info ✓ MPI found: the trainer runs data-parallel under mpirun)
  MPI := 1
else
  $(info ✗ MPI not found (no mpicxx): single-process trainer)
endif

# a build directory per OpenMP setting, so NO_OMP=1 never reuses an OpenMP object
BUILD := build/$(if $(filter 1,$(NO_OMP)),noomp,omp)
TRAIN := $(BUILD)$(if $(MPI),/mpi)/train_gpt2_lora
# the product: the trainer, lora.h and the headers of lib/ (never anything under dev/)
PRODUCT_SOURCES := train_gpt2_lora.cpp lora.h $(wildcard lib/*.h)
TEST_SOURCES := test_lora.cpp $(wildcard dev/test_tokenizer.cpp)

.PHONY: all test clean FORCE
all: train_gpt2_lora

# always checked: after `make test NO_OMP=1` the copy here is the single-threaded build, which a plain
# `make` must replace with its own even though the copy is newer
train_gpt2_lora: $(TRAIN) FORCE
	@cmp -s $< $@ || { echo "cp $< $@"; cp $< $@.tmp && mv $@.tmp $@; }

FORCE:

$(TRAIN): $(PRODUCT_SOURCES)
	@mkdir -p $(@D)
	$(if $(MPI),mpicxx -DUSE_MPI,$(CXX)) $(CXXFLAGS) $< $(LDFLAGS) $(LDLIBS) -o $@

$(BUILD)/test_lora: $(TEST_SOURCES) $(PRODUCT_SOURCES) $(wildcard dev/fuzz/*.h)
	@mkdir -p $(BUILD)
	$(CXX) $(CXXFLAGS) $(TEST_SOURCES) $(LDFLAGS) $(LDLIBS) -o $@

# the tests also run the trainer binary (bad-input exit codes), so build both with the same flags
test: $(BUILD)/test_lora $(TRAIN)
	@cmp -s $(TRAIN) train_gpt2_lora || { cp $(TRAIN) train_gpt2_lora.tmp && mv train_gpt2_lora.tmp train_gpt2_lora; }
	TRAIN_BIN=$(TRAIN) MPIRUN=$(if $(MPI),mpirun) ./$(BUILD)/test_lora

clean:
	rm -rf build train_gpt2_lora

-include dev/data.mk dev/twin.mk dev/bench.mk dev/asan.mk dev/isa.mk dev/fuzz.mk dev/run.mk dev/compare.mk dev/check.mk
