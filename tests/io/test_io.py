from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from medloupe.errors import (
    CorruptImageError,
    EmptyImageError,
    ImageIntakeError,
    ImageTooLargeError,
    UnsupportedImageError,
    UnsupportedTransferSyntaxError,
)
from medloupe.io import detect_format, load_image
from medloupe.io.render import neighbour_correlation


def test_chest_cr_monochrome1_is_inverted(chest_dcm: Path) -> None:
    img = load_image(chest_dcm)
    rec = img.record
    assert (rec.format, rec.modality, rec.body_part) == ("dicom", "CR", "CHEST")
    assert (rec.width, rec.height, rec.channels) == (1841, 1955, 1)
    assert rec.photometric == "MONOCHROME1"
    # the file's PixelSpacing is 0\0: spacing is unknown, with a note saying so
    assert rec.spacing_mm is None and any("not positive" in n for n in rec.notes)
    # MONOCHROME1: high stored values are dark, so after inversion display falls as raw rises
    assert img.raw is not None
    corr = np.corrcoef(img.raw.ravel()[::97], img.display.ravel()[::97].astype(float))[0, 1]
    assert corr < -0.9
    assert img.display.dtype == np.uint8


def test_ct_rescale_to_hounsfield_and_spacing(ct_dcm: Path) -> None:
    ds = pydicom.dcmread(ct_dcm)
    img = load_image(ct_dcm)
    stored = ds.pixel_array.astype(np.float64)
    expected = stored * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert img.raw is not None
    np.testing.assert_allclose(img.raw, expected, rtol=0, atol=1e-3)
    assert img.record.value_unit == "HU"
    assert img.record.spacing_mm == pytest.approx((0.478516, 0.478516))
    assert img.record.spacing_source == "PixelSpacing"
    assert img.record.window == (40.0, 100.0)  # the file's window centre/width
    assert img.raw.min() < -900  # air outside the head is about -1000 HU


def test_imager_pixel_spacing_used_when_no_pixel_spacing(chest_dcm: Path, tmp_path: Path) -> None:
    ds = pydicom.dcmread(chest_dcm)
    del ds.PixelSpacing
    ds.ImagerPixelSpacing = [0.15, 0.16]
    p = tmp_path / "ips.dcm"
    ds.save_as(p)
    rec = load_image(p).record
    assert rec.spacing_mm == (0.15, 0.16)
    assert rec.spacing_source == "ImagerPixelSpacing"
    assert any("magnification" in n for n in rec.notes)


def test_voi_lut_absent_window_falls_back_to_percentiles(ct_dcm: Path, tmp_path: Path) -> None:
    ds = pydicom.dcmread(ct_dcm)
    del ds.WindowCenter
    del ds.WindowWidth
    p = tmp_path / "nowin.dcm"
    ds.save_as(p)
    img = load_image(p)
    assert img.record.window is not None and img.record.window != (40.0, 100.0)
    assert any("percentile" in n for n in img.record.notes)


def test_multiframe_frame_choice(dicom_dir: Path) -> None:
    path = dicom_dir / "OBXXXX1A_2frame.dcm"
    f0, f1 = load_image(path, frame=0), load_image(path, frame=1)
    assert f0.record.frames == 2 and f1.record.frame == 1
    assert f0.record.content_hash != f1.record.content_hash
    with pytest.raises(ImageIntakeError, match="frame 5 requested but the file has 2"):
        load_image(path, frame=5)


def test_colour_ultrasound(dicom_dir: Path) -> None:
    img = load_image(dicom_dir / "US1_UNCR.dcm")
    assert img.record.channels == 3 and img.display.shape == (480, 640, 3)
    assert img.raw is None


def _nifti(tmp_path: Path, affine: np.ndarray) -> tuple[Path, np.ndarray]:
    import nibabel as nib

    data = np.zeros((20, 30, 10), dtype=np.int16)
    data[15:18, 2:5, :] = 1000  # high x (RAS+: patient's right), low y (posterior)
    img = nib.Nifti1Image(data, affine)
    img.header.set_zooms((0.8, 0.9, 2.5))
    p = tmp_path / "vol.nii.gz"
    nib.save(img, p)
    return p, data


def test_nifti_axial_slice_orientation_and_spacing(tmp_path: Path) -> None:
    p, _ = _nifti(tmp_path, np.diag([0.8, 0.9, 2.5, 1.0]))
    img = load_image(p, axis=2, slice_index=4)
    rec = img.record
    assert (rec.format, rec.width, rec.height, rec.frames, rec.frame) == ("nifti", 20, 30, 10, 4)
    assert rec.spacing_mm == pytest.approx((0.9, 0.8))  # (row = y, column = x)
    assert rec.slice_thickness_mm == pytest.approx(2.5)
    ys, xs = np.nonzero(img.display > 128)
    # posterior (low y) is at the bottom; the patient's right (+x) is on the viewer's left
    assert ys.min() >= 25 and xs.max() <= 4


def test_nifti_flipped_affine_gives_same_display(tmp_path: Path) -> None:
    p1, data = _nifti(tmp_path, np.diag([0.8, 0.9, 2.5, 1.0]))
    import nibabel as nib

    flipped = nib.Nifti1Image(
        data[::-1].copy(),
        np.diag([-0.8, 0.9, 2.5, 1.0])
        @ np.array([[1, 0, 0, -19], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]),
    )
    p2 = tmp_path / "flipped.nii"
    nib.save(flipped, p2)
    a, b = load_image(p1, axis=2, slice_index=4), load_image(p2, axis=2, slice_index=4)
    np.testing.assert_array_equal(a.display, b.display)
    with pytest.raises(ImageIntakeError, match="slice 10 requested"):
        load_image(p1, axis=2, slice_index=10)


def test_png_gray_rgb_and_16bit(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    img = load_image(tmp_path / "c.png")
    assert img.record.channels == 3 and img.record.format == "png"
    Image.fromarray(rgb[..., 0]).save(tmp_path / "g.jpg")
    assert load_image(tmp_path / "g.jpg").record.channels == 1
    wide = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 10
    Image.fromarray(wide).save(tmp_path / "w.png")
    w = load_image(tmp_path / "w.png")
    assert w.raw is not None and w.raw.max() == pytest.approx(float(wide.max()))


# --- bad input ----------------------------------------------------------------------------


def test_empty_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.dcm"
    p.write_bytes(b"")
    with pytest.raises(EmptyImageError, match="empty"):
        load_image(p)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageIntakeError, match="no such file"):
        load_image(tmp_path / "nope.png")


def test_unrecognised_bytes(tmp_path: Path) -> None:
    p = tmp_path / "notes.txt"
    p.write_text("hello")
    with pytest.raises(UnsupportedImageError, match="unrecognised file format"):
        load_image(p)


def test_truncated_png(tmp_path: Path) -> None:
    Image.fromarray(np.full((200, 200), 7, np.uint8)).save(tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptImageError):
        load_image(tmp_path / "t.png")


def test_truncated_dicom_pixel_data(ct_dcm: Path, tmp_path: Path) -> None:
    data = ct_dcm.read_bytes()
    p = tmp_path / "trunc.dcm"
    p.write_bytes(data[: len(data) - 200_000])
    with pytest.raises((CorruptImageError, EmptyImageError)):
        load_image(p)


def test_garbage_with_dicom_extension(tmp_path: Path) -> None:
    p = tmp_path / "x.dcm"
    p.write_bytes(b"\x00\x01garbage" * 50)
    with pytest.raises(CorruptImageError):
        load_image(p)


def test_unsupported_transfer_syntax(ct_dcm: Path, tmp_path: Path) -> None:
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(ct_dcm)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 video: no decoder exists
    ds.PixelData = encapsulate([b"\x00" * 1024])
    ds["PixelData"].VR = "OB"
    p = tmp_path / "mpeg.dcm"
    ds.save_as(p, enforce_file_format=True)
    with pytest.raises(UnsupportedTransferSyntaxError, match="MPEG2") as info:
        load_image(p)
    assert "medloupe[codecs]" in str(info.value)


def test_too_many_pixels_checked_before_decoding(chest_dcm: Path, tmp_path: Path) -> None:
    with pytest.raises(ImageTooLargeError, match="exceeds the limit of 1,000,000"):
        load_image(chest_dcm, max_pixels=1_000_000)
    Image.fromarray(np.zeros((300, 400), np.uint8)).save(tmp_path / "big.png")
    with pytest.raises(ImageTooLargeError, match="MEDLOUPE_MAX_PIXELS"):
        load_image(tmp_path / "big.png", max_pixels=100_000)


def test_corrupt_nifti(tmp_path: Path) -> None:
    p = tmp_path / "bad.nii.gz"
    p.write_bytes(gzip.compress(b"not a nifti header" * 10))
    with pytest.raises(CorruptImageError):
        load_image(p)


def test_detect_format_sniffs_content(ct_dcm: Path, tmp_path: Path) -> None:
    renamed = tmp_path / "scan.bin"
    renamed.write_bytes(ct_dcm.read_bytes())
    assert detect_format(renamed) == "dicom"


def test_non_finite_values_render_and_are_flagged(ct_dcm: Path, tmp_path: Path) -> None:
    """One NaN/Inf pixel renders black with a finite window; a NaN rescale slope (every value
    NaN) is flagged, never rendered as garbage with a NaN window."""
    import nibabel as nib

    vol = np.linspace(-1000, 1000, 32 * 32 * 3, dtype=np.float32).reshape(32, 32, 3)
    vol[5, 5, 1], vol[6, 6, 1] = np.nan, np.inf
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "nan.nii")
    one = load_image(tmp_path / "nan.nii", modality="CT")
    assert one.record.window is not None and all(np.isfinite(one.record.window))
    assert one.record.quality == []
    ds = pydicom.dcmread(ct_dcm)
    ds.RescaleSlope = "NaN"
    ds.save_as(tmp_path / "nan-slope.dcm")
    bad = load_image(tmp_path / "nan-slope.dcm")
    assert bad.record.window is None or all(np.isfinite(bad.record.window))
    assert any("not numbers" in q for q in bad.record.quality)


def test_tiny_and_blank_images_are_flagged(tmp_path: Path) -> None:
    Image.fromarray(np.full((1, 1), 200, np.uint8)).save(tmp_path / "dot.png")
    Image.fromarray(np.full((64, 64), 7, np.uint8)).save(tmp_path / "blank.png")
    Image.fromarray((np.arange(64 * 64) % 251).astype(np.uint8).reshape(64, 64)).save(
        tmp_path / "ok.png"
    )
    assert any("below 16" in q for q in load_image(tmp_path / "dot.png").record.quality)
    assert any("blank" in q for q in load_image(tmp_path / "blank.png").record.quality)
    assert load_image(tmp_path / "ok.png").record.quality == []


def test_random_noise_is_flagged_and_real_images_are_not(ct_dcm: Path, tmp_path: Path) -> None:
    """Noise (uniform grey, Gaussian, salt-and-pepper, RGB) cannot inform an answer; a real CT
    slice and a smooth ramp can."""
    rng = np.random.default_rng(0)
    noises = {
        "uniform.png": rng.integers(0, 256, (256, 256), dtype=np.uint8),
        "gauss.png": np.clip(128 + 40 * rng.standard_normal((300, 200)), 0, 255).astype(np.uint8),
        "salt.png": ((rng.random((128, 128)) > 0.5) * 255).astype(np.uint8),
        "rgb.png": rng.integers(0, 256, (1100, 900, 3), dtype=np.uint8),
    }
    for name, pixels in noises.items():
        Image.fromarray(pixels).save(tmp_path / name)
        quality = load_image(tmp_path / name).record.quality
        assert any("random noise" in q for q in quality), (name, quality)
    assert load_image(ct_dcm).record.quality == []
    ramp = np.add.outer(np.arange(200), np.arange(300)).astype(np.float32)
    assert neighbour_correlation(ramp) > 0.99
    assert neighbour_correlation(np.zeros((20, 20), np.uint8)) == 1.0


def _broken(kind: str, ct: pydicom.Dataset, tmp: Path) -> Path:
    """A CT file of pydicom-data broken in one way."""
    from pydicom.dataelem import DataElement
    from pydicom.dataset import Dataset

    ds = ct.copy()
    if kind == "text rescale slope":
        ds.add(DataElement(0x00281053, "LO", "abc"))
    elif kind == "malformed VOI LUT":
        item = Dataset()
        item.LUTDescriptor, item.LUTData = [256, 0, 8], b"\x00" * 3
        ds.VOILUTSequence = [item]
        del ds.WindowCenter, ds.WindowWidth
    elif kind == "malformed modality LUT":
        item = Dataset()
        item.LUTDescriptor, item.LUTData, item.ModalityLUTType = [4096, 0, 12], b"\x01\x02", "HU"
        ds.ModalityLUTSequence = [item]
    elif kind == "negative NumberOfFrames":
        ds.NumberOfFrames = -3
    path = tmp / f"{kind.replace(' ', '-')}.dcm"
    ds.save_as(path)
    return path


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("text rescale slope", "could not be rendered: a rescale.* is not a number"),
        ("malformed VOI LUT", "could not be rendered: a lookup table holds fewer entries"),
        ("malformed modality LUT", "could not be rendered: a lookup table holds fewer entries"),
        ("negative NumberOfFrames", "is not a positive frame count"),
    ],
)
def test_broken_headers_are_named_errors(
    kind: str, message: str, ct_dcm: Path, tmp_path: Path
) -> None:
    path = _broken(kind, pydicom.dcmread(ct_dcm), tmp_path)
    with pytest.raises(CorruptImageError, match=message):
        load_image(path)


def test_a_file_cut_before_its_pixels_is_called_truncated(ct_dcm: Path, tmp_path: Path) -> None:
    data = ct_dcm.read_bytes()
    ds = pydicom.dcmread(ct_dcm)
    cut = tmp_path / "cut.dcm"
    # the bytes up to the Pixel Data element's tag: a header without its image
    cut.write_bytes(data[: data.rindex(b"\xe0\x7f\x10\x00")])
    assert "Rows" in ds
    with pytest.raises(CorruptImageError, match="ends before its pixel data: truncated"):
        load_image(cut)


def test_pydicom_data_palette_and_planar_cases(dicom_dir: Path, tmp_path: Path) -> None:
    """A palette file with no file meta (read as it was written) loads in colour; a palette
    without its lookup table, and RGB without PlanarConfiguration, are named errors."""
    face = load_image(dicom_dir / "OT-PAL-8-face.dcm")
    assert (face.record.channels, face.record.width, face.record.height) == (3, 640, 480)
    pal = pydicom.dcmread(dicom_dir / "OT-PAL-8-face.dcm", force=True)
    for colour in ("Red", "Green", "Blue"):
        delattr(pal, f"{colour}PaletteColorLookupTableData")
    pal.save_as(tmp_path / "no-lut.dcm")
    with pytest.raises(CorruptImageError, match="Palette"):
        load_image(tmp_path / "no-lut.dcm")
    us = pydicom.dcmread(dicom_dir / "US1_UNCR.dcm")
    del us.PlanarConfiguration
    us.save_as(tmp_path / "no-planar.dcm")
    with pytest.raises(CorruptImageError, match="Planar Configuration"):
        load_image(tmp_path / "no-planar.dcm")


def test_singular_nifti_affine_is_a_named_error(tmp_path: Path) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(np.arange(192, dtype=np.float32).reshape(8, 8, 3), np.eye(4))
    img.set_qform(None, code=0)
    img.set_sform(np.diag([1.0, 1.0, 0.0, 1.0]), code=1)
    nib.save(img, tmp_path / "singular.nii")
    with pytest.raises(CorruptImageError, match="singular"):
        load_image(tmp_path / "singular.nii")


def test_header_values_outside_the_defined_terms_are_left_out(
    chest_dcm: Path, tmp_path: Path
) -> None:
    """BodyPartExamined and ViewPosition are kept only as their defined terms: a name typed
    into one never reaches a record (and so no prompt, trace, answer or page)."""
    ds = pydicom.dcmread(chest_dcm)
    ds.BodyPartExamined, ds.ViewPosition = "CHEST Marjoribanks", "PA Smith"
    ds.save_as(tmp_path / "phi.dcm")
    rec = load_image(tmp_path / "phi.dcm").record
    assert rec.body_part is None and rec.view_position is None
    assert "Marjoribanks" not in rec.model_dump_json() and "Smith" not in rec.model_dump_json()
    assert any("BodyPartExamined is not one of its defined terms" in n for n in rec.notes)
    ds.BodyPartExamined, ds.ViewPosition = "chest", "pa"
    ds.save_as(tmp_path / "ok.dcm")
    ok = load_image(tmp_path / "ok.dcm").record
    assert (ok.body_part, ok.view_position) == ("CHEST", "PA")
