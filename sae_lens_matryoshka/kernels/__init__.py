"""Pure tensor functions of the training step: selection, the sparse encoder backward, level decodes.

Nothing here knows an SAE, a config or a process group. With ``batchtopk``
and ``topk`` at most ``k`` of ``d_sae`` latents are active per token. Only the
encoder's forward matmul must be dense (every pre-activation competes in the
selection); everything after it is computed from the active ``(token,
latent)`` entries. Every sparse function here keeps the entries
**token-major**, as the selections produce them: tokens non-decreasing and,
within a token, latents increasing. That order is what makes the rest cheap:
a token's entries are contiguous (a CSR row) and a token's entries of one
Matryoshka group follow each other, so the bags need no sort and the sparse
product takes the entries as they are.

- ``selection``: the entries a dense top-k would keep (BatchTopK, TopK);
  BatchTopK's without a host read by whichever of two is faster where it
  runs (measured): filtering with a threshold estimated from a sample so
  that the full ``n_tokens x d_sae`` ranking never runs (the faster on
  CPU), or one ``topk`` over the whole matrix (a radix select of a few
  passes on a GPU); the dense TopK; and each token's most active dead
  latents for the aux loss, picked the cheaper of two ways for how many
  are dead;
- ``measured``: a kernel with several implementations computing the same,
  the fastest timed on the first call for each shape where it runs and kept
  per machine; which wins depends on the machine, the shapes and the entries
  per token, so each sparse product of the step is one (``W_enc``'s
  gradient, the groups' decode, ``W_dec``'s gradient and the decoded values'
  gradient) and so is BatchTopK's selection;
- ``encoder_backward``: selected pre-activations with an encoder backward that
  touches only the selected latents (the ``W_enc`` gradient is one
  sparse-dense product with the gradient matrix in compressed form, or one
  ``embedding_bag`` over the entries sorted by latent, whichever is faster);
  and the entries' latent-major order (``EntryOrder``), which the ``W_enc``
  and ``W_dec`` gradients (sums per latent) share: one stable sort per set
  of entries, on one thread on CPU, where torch's parallel radix sort
  stalls on shared cores (``latent_major_order``);
- ``level_decode``: every Matryoshka level at once, densely (one cumulative
  decode) or from the entries (one sparse product over (token, group) bags,
  an ``embedding_bag`` or a CSR product, whichever is faster, then a running
  sum over groups, with a ``W_dec`` gradient measured the same way that takes
  the shared order instead of sorting the entries again, and a values'
  gradient measured too);
- ``kept_memory``: on CPU, the memory of ``W_enc``'s and ``W_dec``'s
  gradients and of the pre-activations kept from one step to the next (glibc
  hands blocks this large back to the operating system, and every step
  faulted them in anew), handed out again only once nothing holds it; the
  two gradient kernels and the encoder's matmul write there;
- ``entry_sets``: several sets of a step's entries through one weight (the
  reconstruction's and the dead-latent loss's), whose gradients the first
  set's backward computes in one kernel call, where autograd would sum
  separate gradients into new memory;
- ``jumprelu``: the JumpReLU and its straight-through estimators;
- ``threads``: torch on one thread, where its intra-op threads only wait for
  each other (sorts on shared cores, tiny tensors).

The dense path (``training_path="dense"``) computes the same loss and gradients
with dense matmuls; the tests hold the two equal.
"""
