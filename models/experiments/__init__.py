"""The runners and measurements behind the docs, outside the library (not part of the product).

    results/            valve-model results: the paper's tables on the public data (docs/results.md)
    realdata.py         valve-model realdata: the paper's slicing on the public data (docs/results.md)
    saliency_bench.py   valve-model bench: eager + autograd vs in-graph Grad-CAM++ (docs/performance.md)
    segmentation.py     the runtime's masks and PLC areas on unseen synthetic parts (docs/model.md)
    trainability.py     why the compact IRA-CNN learns slower per step (docs/trainability.md)
"""
