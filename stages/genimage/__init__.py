"""GenImage data: a dataset folder's index, the ImageNet classes, synthetic folders; imports no stages."""
