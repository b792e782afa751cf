# `make run`: the README's first command (dev/run.sh does the work; see its header). Builds, prepares
# data, pretrains a small base on the Brown corpus unless llm.c's GPT-2 124M is in data/, then
# LoRA-fine-tunes it on tinyshakespeare and measures the form of the text before and after (dev/form_stats.cpp).
# Cached steps are skipped on a second run.
# Included by the top-level Makefile, which defines CXX, CXXFLAGS, LDFLAGS and BUILD.

# a random GPT-2 (any L, C, NH, maxT; GPT-2's vocabulary) as an llm.c checkpoint: the start of pretraining
$(BUILD)/make_random_model: dev/make_random_model.cpp $(PRODUCT_SOURCES)
	@mkdir -p $(BUILD)
	$(CXX) $(CXXFLAGS) $< $(LDFLAGS) $(LDLIBS) -o $@

# the summary's measure of form (newlines, line length, speaker tags, tokens Brown never had) of sampled text
$(BUILD)/form_stats: dev/form_stats.cpp $(PRODUCT_SOURCES)
	@mkdir -p $(BUILD)
	$(CXX) $(CXXFLAGS) $< $(LDFLAGS) $(LDLIBS) -o $@

run:
	@MAKE="$(MAKE)" RANDOM_MODEL="$(BUILD)/make_random_model" FORM_STATS="$(BUILD)/form_stats" bash dev/run.sh

# fetch llm.c's starter pack (GPT-2 124M and friends) into data/; needs internet
starter-pack:
	bash dev/download_starter_pack.sh

.PHONY: run starter-pack
