"""The export engine: a diffusers pipeline -> the ONNX folder convert takes, each model checked
against PyTorch.

    export.py           the engine (sd2mnn.export), over each family's exporter (sd2mnn.exporters)
    diffusers_folder.py a model folder checked before anything loads
    checkpoint.py       a single-file checkpoint -> a diffusers folder, one model at a time
"""
