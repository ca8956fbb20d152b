"""maskrt.plugins: the MultilevelRoIAlign plugin (C++/CUDA), its contract, CPU twin and build helper.

Never imports torch.
"""
