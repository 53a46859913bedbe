"""Data layer: Pascal VOC pairs, images, validation, split, preprocessing, augmentation, sample data.

Nothing here imports model code (utils.detection) or workflow code (utils.pegasus).
"""
