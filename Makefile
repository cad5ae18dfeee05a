# mxonnx: see README.md. Every target works on a fresh machine: it installs what it needs.
SHELL := /bin/bash
PY := .venv/bin/python
MX := .venv/bin/mxonnx
CACHE := models/cache
GGUF := $(CACHE)/SmolLM2-135M-Instruct.Q4_1.gguf
FP32 := $(CACHE)/smollm2-135m-fp32
W4A8 := $(CACHE)/smollm2-135m-w4a8-mxint4-128-awq-gptq
DEMO_CALIB ?= 32
DEMO_WINDOWS ?= 4

.PHONY: install native test sanitize models demo bench bench-quick bench-scale clean

install: .venv/.installed native

# the native onnxruntime op library (C++, plain g++ call; headers from the amd-quark wheel, checked by sha256)
native: .venv/.installed
	$(PY) -m mxonnx.ops.native build

.venv/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

test: install
	$(PY) -m pytest -q tests

# the native op tests under AddressSanitizer + UndefinedBehaviorSanitizer
sanitize: .venv/.installed
	$(PY) -m mxonnx.ops.native build --sanitize
	LD_PRELOAD="$$(g++ -print-file-name=libasan.so) $$(g++ -print-file-name=libstdc++.so)" \
	  ASAN_OPTIONS=detect_leaks=0 MXONNX_NATIVE_LIB="$$($(PY) -m mxonnx.ops.native path --sanitize)" \
	  $(PY) -m pytest -q tests/test_native.py tests/test_fused.py

models: install $(GGUF)

$(GGUF):
	$(PY) -m mxonnx.models fetch smollm2-135m-instruct

$(FP32)/model.onnx: $(GGUF)
	$(MX) export $(GGUF) -o $(FP32)

demo: models $(FP32)/model.onnx
	@echo "== quantize: W MXINT4-128 / A MXINT8-128, AWQ+GPTQ on $(DEMO_CALIB) calibration windows of 512 tokens"
	@echo "   (the weights of this GGUF already sit on a 4-bit Q4_1 grid)"
	rm -rf $(W4A8) && $(MX) quantize $(FP32) -o $(W4A8) --weights mxint4-128 --acts mxint8-128 --method awq+gptq --calib-samples $(DEMO_CALIB)
	@echo "== inspect"
	$(MX) inspect $(W4A8)
	@echo "== perplexity on the first $(DEMO_WINDOWS) windows of 2048 tokens of WikiText-2 test"
	$(MX) eval $(FP32) --max-windows $(DEMO_WINDOWS)
	$(MX) eval $(W4A8) --max-windows $(DEMO_WINDOWS)
	$(MX) generate $(W4A8) "What is the capital of France?" --max-new-tokens 16

bench: models
	$(PY) bench/run.py

bench-quick: models
	$(PY) bench/run.py --quick

# time and peak RSS of every command on synthetic Llama-2-7B-shaped models (issue 17); 32 layers: SCALE_LAYERS=32
SCALE_LAYERS ?= 2,4,8
bench-scale: install
	$(PY) bench/scale.py --layers $(SCALE_LAYERS)

clean:
	rm -rf build dist *.egg-info .pytest_cache mxonnx/ops/native/build
