"""Datasets: structure records in LMDB (store), ingest from ASE files, subsets/splits and training batches."""
from training.data.records import Structure
from training.data.store import Dataset, write_dataset
from training.data.subsets import load_split, save_split, select, split_by_group

__all__ = ["Structure", "Dataset", "write_dataset", "select", "split_by_group", "save_split", "load_split"]
