class MultiHeadAttention: pass
