"""BEST-RQ random-projection quantizer: frozen targets for masked-token prediction."""
import torch
from speechbrain.processing.features import InputNormalization

TARGET_NORMALIZATIONS = ("none", "utterance")


class RandomProjectionQuantizer(torch.nn.Module):
    """Maps clean features to code indices with frozen random projections and codebooks.

    The ``s`` input frames of each encoder frame are stacked, projected to ``code_dim``,
    l2-normalized and matched to the nearest of ``num_classes`` unit-norm codes, once per
    codebook. Projections and codebooks are buffers: frozen, and saved with the model.

    Arguments
    ---------
    n_mels : feature dimension.
    subsampling_factor : input frames per encoder frame (``s``).
    code_dim : dimension of the codes.
    num_classes : codes per codebook.
    num_books : number of independent codebooks.
    seed : seed of the random projections and codebooks.
    target_normalization : ``"none"``: codes of the features as given (the encoder's globally
        normalized input); ``"utterance"``: each utterance first normalized to zero mean and
        unit variance over its own frames, meant to keep a voice's spectral tilt and loudness
        from picking the codes. Targets are never streamed, so the whole utterance may be used.

    Example
    -------
    >>> quantizer = RandomProjectionQuantizer(n_mels=80, subsampling_factor=4, num_classes=64)
    >>> quantizer(torch.randn(2, 10, 80)).shape
    torch.Size([2, 3, 1])
    """

    def __init__(self, n_mels: int = 80, subsampling_factor: int = 4, code_dim: int = 16,
                 num_classes: int = 8192, num_books: int = 1, seed: int = 0,
                 target_normalization: str = "none", rows_per_step: int = 4096):
        super().__init__()
        if target_normalization not in TARGET_NORMALIZATIONS:
            raise ValueError(f"target_normalization must be one of {TARGET_NORMALIZATIONS}, "
                             f"got {target_normalization!r}")
        # SpeechBrain's per-sentence statistics skip the padding (relative lengths).
        self.utterance_normalization = (InputNormalization(norm_type="sentence")
                                        if target_normalization == "utterance" else None)
        self.subsampling_factor = subsampling_factor
        self.num_classes = num_classes
        self.rows_per_step = rows_per_step
        generator = torch.Generator().manual_seed(seed)
        projection = torch.empty(num_books, n_mels * subsampling_factor, code_dim)
        for book in projection:
            torch.nn.init.xavier_normal_(book, generator=generator)
        codebooks = torch.randn(num_books, num_classes, code_dim, generator=generator)
        self.register_buffer("projection", projection)
        self.register_buffer("codebooks", torch.nn.functional.normalize(codebooks, dim=-1))

    @property
    def num_books(self) -> int:
        return self.codebooks.shape[0]

    @torch.no_grad()
    def forward(self, feats: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, n_mels) clean features -> (B, ceil(T / s), num_books) long code indices.

        ``lengths``: (B,) relative lengths, for the per-utterance statistics (default: all 1).

        Always float32, also under autocast: a bf16 projection would move a few percent of the
        frames to another code, so training and validation targets would disagree.
        """
        with torch.autocast(feats.device.type, enabled=False):
            feats = feats.float()
            if self.utterance_normalization is not None:
                if lengths is None:
                    lengths = torch.ones(feats.shape[0], device=feats.device)
                feats = self.utterance_normalization(feats, lengths.float())
            return self._codes(feats)

    def _codes(self, feats: torch.Tensor) -> torch.Tensor:
        batch, frames, dim = feats.shape
        s = self.subsampling_factor
        feats = torch.nn.functional.pad(feats, (0, 0, 0, -frames % s))
        stacked = feats.reshape(batch, -1, s * dim).reshape(-1, s * dim)
        codes = torch.empty(stacked.shape[0], self.num_books, dtype=torch.long, device=feats.device)
        for book in range(self.num_books):
            # Rows in blocks: the score matrix is at most rows_per_step x num_classes.
            for start in range(0, stacked.shape[0], self.rows_per_step):
                rows = stacked[start:start + self.rows_per_step] @ self.projection[book]
                rows = torch.nn.functional.normalize(rows, dim=-1)
                # Unit vectors: nearest code (l2) = largest dot product.
                codes[start:start + self.rows_per_step, book] = (
                    rows @ self.codebooks[book].T).argmax(-1)
        return codes.view(batch, -1, self.num_books)
