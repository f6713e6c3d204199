"""The convert engine: ONNX pipeline folder -> MNN bundle.

    convert.py          run the converter per component, stage, commit, report (sd2mnn.convert)
    plan.py             ConvertOptions; what each component needs: convert, reuse or resume
    converter_flags.py  the one table of MNNConvert flags (options, CLI, sweep, verify read it)
    converter.py        finding the converter; _mnnconvert.py runs the MNN package's, no network
    _probe.py           the load check, in a child
"""
