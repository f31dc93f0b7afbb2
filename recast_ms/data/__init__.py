"""Data sources (MiniOneRec Amazon, synthetic), the shared ``Sample`` type, and prompt rendering."""
from recast_ms.data.amazon import load_amazon
from recast_ms.data.sample import LoadReport, Sample, Splits, split_by_user
from recast_ms.data.synthetic import SyntheticConfig, make_synthetic

__all__ = ["LoadReport", "Sample", "Splits", "SyntheticConfig", "load_amazon", "make_synthetic", "split_by_user"]
