"""The verify engine: each MNN component against its ONNX source, the runtime contract, the
conditioning.

    verify.py        the engine (sd2mnn.verify)
    inputs.py        the inputs both runtimes are fed
    conditioning.py  prompts through both tokenizers and text encoders
    sources.py       an ONNX folder checked to be the bundle's sources
    _pass.py         one runtime's pass, in a child for big models
"""
