"""(placeholder: the kernels land here; see registry.py for the contract)"""
