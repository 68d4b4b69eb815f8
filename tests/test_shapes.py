"""The procedural shapes dataset and the word-level tokenizer."""
import pytest
import torch

from mmdit.tiny import shapes
from mmdit.tiny.wordtok import SPECIALS, WordTokenizer, split_words


def test_batch_is_deterministic_and_well_formed():
    a, b, c = shapes.batch(12, 3), shapes.batch(12, 3), shapes.batch(12, 4)
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (12, 3, 64, 64) and a.images.dtype == torch.float32
    assert a.images.min() >= -1 and a.images.max() <= 1
    assert (a.colour != a.background).all()  # the shape never takes the background's colour
    for cap, col, shp, bg in zip(a.captions, a.colour, a.shape, a.background):
        words = split_words(cap)
        assert shapes.COLOURS[col] in words and shapes.SHAPES[shp] in words and shapes.COLOURS[bg] in words
        assert words.index(shapes.COLOURS[col]) < words.index(shapes.SHAPES[shp]) < words.index("background")
    covered = a.mask.flatten(1).mean(1)
    assert ((covered > 0.05) & (covered < 0.6)).all(), covered  # a visible shape, inside the frame


def test_stream_and_sizes():
    it = shapes.stream(4, seed=7)
    first, second = next(it), next(it)
    assert first.captions == shapes.batch(4, 7 * 1_000_003).captions
    assert not torch.equal(first.images, second.images)
    assert shapes.batch(3, 0, size=32).images.shape == (3, 3, 32, 32)


def test_canonical_caption():
    assert shapes.caption("red", "circle", "blue") == "a red circle on a blue background"
    assert shapes.caption("orange", "square", "white") == "an orange square on a white background"


def test_colour_reader_recovers_the_labels():
    """The classifier the quality test uses reads every generated training image correctly
    (texture and background noise included)."""
    data = shapes.batch(256, 11)
    background, shape = shapes.read_colours(data.images)
    assert torch.equal(background, data.background)
    assert torch.equal(shape, data.colour)


def test_texture_keeps_every_pixel_nearest_its_colour():
    """Texture moves a shape pixel along the grey axis by up to TEXTURE_AMPLITUDE (then clips);
    at either extreme it still classifies as its own palette colour."""
    pal = shapes.palette_tensor()
    for sign in (-1, 1):
        shifted = (pal + sign * shapes.TEXTURE_AMPLITUDE).clamp(-1, 1)
        assert shapes.classify(shifted.view(-1, 3, 1, 1)).flatten().tolist() == list(range(len(pal)))


def test_tokenizer_round_trip(tmp_path):
    tok = WordTokenizer.from_words(shapes.all_words())
    assert [tok.vocab[s] for s in SPECIALS] == [0, 1, 2, 3]
    with pytest.warns(UserWarning, match="'teal'"):  # named once, then <unk>
        ids = tok(["a red circle on a blue background", "", "a teal circle"], max_length=10)
    assert ids.shape == (3, 10) and ids.dtype == torch.long
    assert ids[0, 0] == tok.bos_id and ids[0, 8] == tok.eos_id and (ids[0, 9:] == tok.pad_id).all()
    assert ids[1, :2].tolist() == [tok.bos_id, tok.eos_id]
    assert ids[2, 2] == tok.unk_id  # "teal" is not a palette word
    assert tok.decode(ids[0]) == "a red circle on a blue background"
    cut = tok(["a red circle on a blue background"], max_length=5)
    assert cut[0].tolist()[-1] == tok.eos_id  # truncation keeps <eos>
    tok.save(tmp_path / "vocab.json")
    again = WordTokenizer.from_file(tmp_path / "vocab.json")
    assert again.vocab == tok.vocab


def test_every_caption_word_is_in_the_vocabulary():
    tok = WordTokenizer.from_words(shapes.all_words())
    ids = tok(shapes.batch(200, 1).captions, max_length=16)
    assert (ids != tok.unk_id).all()
    assert (ids == tok.eos_id).sum(1).eq(1).all()  # every caption fits in 16 tokens


def test_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        WordTokenizer.from_file(tmp_path / "vocab.json")
    with pytest.raises(ValueError, match="special tokens"):
        WordTokenizer({"a": 0})


def test_texture_words_in_captions():
    data = shapes.batch(200, 2)
    named = 0
    for cap, tex, col, shp in zip(data.captions, data.texture, data.colour, data.shape):
        words = split_words(cap)
        if shapes.TEXTURES[tex] in words:
            named += 1
            assert words.index(shapes.COLOURS[col]) < words.index(shapes.TEXTURES[tex]) < words.index(shapes.SHAPES[shp])
        else:
            assert not set(shapes.TEXTURES) & set(words)  # an untextured caption names no texture at all
    assert 0.7 < named / 200 < 0.9  # TEXTURE_WORD_P = 0.8
    assert shapes.caption("red", "circle", "blue", texture="striped") == "a red striped circle on a blue background"
    assert torch.bincount(data.texture, minlength=5).min() > 20  # all five textures occur


def test_readers_recover_shape_and_texture_of_renders():
    """The shape (bounding-box fill) and texture (contrast, correlation, coherence, skew)
    readers that dg_detail.py scores generated images with are right on >= 97% of renders."""
    data = shapes.batch(300, 9)
    shape = shapes.read_shapes(data.images, data.colour)
    texture = shapes.read_textures(data.images, data.colour)
    assert (shape == data.shape).float().mean() >= 0.97
    assert (texture == data.texture).float().mean() >= 0.97
    blurred = torch.nn.functional.avg_pool2d(data.images, 5, 1, 2, count_include_pad=False)
    assert (shapes.read_textures(blurred, data.colour) == 0).float().mean() > 0.6  # blur erases detail: "plain"

