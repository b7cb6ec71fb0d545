"""Check a data root the way the original tutorial does: python tutorial_dataset_test.py [ROOT]"""
import argparse

from tutorial_dataset import MyDataset

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("root", nargs="?", default="./training/fill50k", help="data root (default: %(default)s)")
dataset = MyDataset(parser.parse_args().root)
print(len(dataset))

item = dataset[0]
jpg = item["jpg"]
txt = item["txt"]
hint = item["hint"]
print(txt)
print(jpg.shape)
print(hint.shape)
