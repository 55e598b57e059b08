"""LightningDataModules and dataset readers (COCO-2014 multi-label, the embedded ``scenes`` data)."""
