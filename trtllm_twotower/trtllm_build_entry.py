"""Entry file for ``trtllm-build --model_cls_file`` (TensorRT-LLM 1.2).

trtllm-build loads this file with ``SourceFileLoader('models', path)`` before it reads the
checkpoint's config.json (tensorrt_llm/commands/build.py, main()), as a top-level module without
a package: it may only use absolute imports. Importing it registers both TwoTower classes in
TensorRT-LLM's MODEL_MAP and loads this project's plugin library (which registers the
"twotower" plugin creators). ``build_engine.py`` prints the commands that use it.
"""

from trtllm_twotower.network import trt as _trt
from trtllm_twotower.plugins.plugin_library import load_trt_plugins

_trt._require()
TwoTowerContextForCausalLM = _trt.MODEL_CLASSES["context"]
TwoTowerDenoiser = _trt.MODEL_CLASSES["denoiser"]
load_trt_plugins()
