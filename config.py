# The original's switch, read by share.py (which the tutorials and scripts written against the original import
# first): True slices attention to save GPU memory. The apps take --low-vram instead and do not read this file.
save_memory = False
