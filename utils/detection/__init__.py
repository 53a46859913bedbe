"""Detection layer: the Faster R-CNN model, training and HPO, inference, evaluation and metrics.

Built on utils.data; never imports workflow code (utils.pegasus).
"""
