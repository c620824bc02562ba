"""raylm.serving"""
