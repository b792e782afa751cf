# Data preparation (dev/data/): the GPT-2 tokenizer and the tinyshakespeare and Brown token files
# under data/. Included by the top-level Makefile, which defines CXX, CXXFLAGS and LDFLAGS.
# node/npm are used only by `data` (to fetch packages when ../shared lacks them) and the dev targets.
PREPARE_DATA := build/prepare_data

$(PREPARE_DATA): dev/data/prepare_data.cpp dev/data/brown_text.h lib/tokenizer.h lib/unicode_classes.h
	@mkdir -p $(dir $@)
	$(CXX) $(CXXFLAGS) $< $(LDFLAGS) -o $@

# data/gpt2_tokenizer.bin, data/tiny_shakespeare_{val,train}.bin, data/brown_{val,train}.bin (kept if present)
data: $(PREPARE_DATA)
	./$(PREPARE_DATA)

# dev check (node + npm): our token files equal the reference encoder's (npm gpt-3-encoder), token for token
check-data: $(PREPARE_DATA)
	./$(PREPARE_DATA) -t data/cache/brown_txt
	node dev/data/check_data.js data/cache/brown_txt

# regenerate the committed fixture dev/fixtures/tokenizer_cases.txt (node + npm)
tokenizer-fixture:
	node dev/data/make_tokenizer_fixture.js

# regenerate lib/unicode_classes.h from node's Unicode tables
unicode-classes:
	node dev/data/gen_unicode_tables.js > lib/unicode_classes.h.tmp && mv lib/unicode_classes.h.tmp lib/unicode_classes.h

.PHONY: data check-data tokenizer-fixture unicode-classes
