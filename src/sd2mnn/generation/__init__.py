"""The generate engine: MNN's C++ runtime's recipe in Python, on MNN or ONNX Runtime.

    pipeline.py  Pipeline: models, tokenizers and a family's recipe (sd2mnn.recipes)
    noise.py     the runtime's initial noise (std::mt19937), bit for bit
"""
