"""What every engine shares: files and paths (files), child processes (children), progress,
the folder layouts (layout), the manifest and the bundle folder (manifest, bundle), ONNX files
streamed (onnx_scan), the two runtimes (runtime), images, MNN's runtime contract (contract) and the
packaged demo pipeline (demo)."""
