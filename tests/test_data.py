"""Bad audio gives clear errors naming the file; LibriSpeech and NeMo manifests -> CSV."""
import csv
import json

import numpy as np
import pytest
import soundfile as sf

from dataio import AudioFileError, check_manifest, dataset_from_manifest, load_audio
from prepare_data import prepare_librispeech, prepare_noise

SR = 16000


def write(path, audio, sample_rate=SR, subtype="PCM_16"):
    sf.write(path, audio, sample_rate, subtype=subtype)
    return str(path)


def bad_files(folder):
    """One file per kind of bad audio, with the phrase its error must contain."""
    rng = np.random.default_rng(0)
    nan_audio = rng.standard_normal(SR).astype(np.float32) * 0.1
    nan_audio[100] = np.nan
    (folder / "empty.wav").write_bytes(b"")
    (folder / "corrupt.wav").write_bytes(b"RIFF\x00\x00garbage" + bytes(rng.integers(0, 255, 500)))
    return {
        str(folder / "missing.wav"): "not found",
        str(folder / "empty.wav"): "empty",
        write(folder / "short.wav", rng.standard_normal(300) * 0.1): "shorter than one encoder frame",
        str(folder / "corrupt.wav"): "not a readable audio file",
        write(folder / "rate8k.wav", rng.standard_normal(8000) * 0.1, 8000): "sample rate 8000 Hz",
        write(folder / "stereo.wav", rng.standard_normal((SR, 2)) * 0.1): "2 channels",
        write(folder / "nan.wav", nan_audio, subtype="FLOAT"): "NaN",
    }


def test_each_bad_file_gets_a_clear_error(tmp_path):
    for path, phrase in bad_files(tmp_path).items():
        with pytest.raises(AudioFileError) as error:
            load_audio(path, SR, min_samples=880)
        assert path in str(error.value) and phrase in str(error.value)


def test_good_audio_loads(tmp_path):
    audio = np.random.default_rng(1).standard_normal(SR) * 0.1
    loaded = load_audio(write(tmp_path / "ok.flac", audio), SR, min_samples=880)
    assert loaded.shape == (SR,) and abs(loaded.numpy() - audio).max() < 1e-3


def write_csv(path, wavs):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ID", "duration", "wav", "spk_id", "wrd"])
        for i, wav in enumerate(wavs):
            writer.writerow([f"utt{i}", "1.0", wav, "spk", "HELLO"])
    return path


def test_manifest_check_lists_every_bad_file(tmp_path):
    bad = bad_files(tmp_path)
    header_bad = [p for p, phrase in bad.items() if phrase != "NaN"]  # NaN needs the samples
    manifest = write_csv(tmp_path / "train.csv", list(bad))
    dataset = dataset_from_manifest(manifest, tmp_path, tmp_path)
    with pytest.raises(AudioFileError) as error:
        check_manifest(dataset, "train.csv", SR, min_samples=880)
    message = str(error.value)
    assert f"{len(header_bad)} bad audio file(s) in train.csv" in message
    assert all(path in message for path in header_bad)


def test_nemo_manifest_is_accepted(tmp_path):
    (tmp_path / "audio").mkdir()
    write(tmp_path / "audio" / "a.wav", np.zeros(SR))
    manifest = tmp_path / "train.json"
    manifest.write_text(json.dumps({"audio_filepath": "audio/a.wav", "duration": 1.0,
                                    "text": "hello world"}) + "\n\n")
    dataset = dataset_from_manifest(manifest, tmp_path, tmp_path / "work")
    with dataset.output_keys_as(["id", "wav", "wrd", "duration"]):
        item = dataset[0]
    assert item["wav"] == str(tmp_path / "audio" / "a.wav")
    assert item["wrd"] == "hello world" and item["duration"] == 1.0
    manifest.write_text('{"duration": 1.0}\n')
    with pytest.raises(ValueError, match="train.json:1"):
        dataset_from_manifest(manifest, tmp_path, tmp_path / "work")


def test_librispeech_layout_to_csv(tmp_path):
    root = tmp_path / "LibriSpeech"
    for split, speakers in (("train-clean-100", ["19", "26"]), ("dev-clean", ["84"])):
        for spk in speakers:
            chapter = root / split / spk / "121"
            chapter.mkdir(parents=True)
            lines = []
            for utt in range(2):
                utt_id = f"{spk}-121-{utt:04d}"
                write(chapter / f"{utt_id}.flac", np.zeros(SR // 2 * (utt + 1)))
                lines.append(f"{utt_id} HELLO WORLD NUMBER {utt}")
            (chapter / f"{spk}-121.trans.txt").write_text("\n".join(lines) + "\n")
    written = prepare_librispeech(root, tmp_path / "csv", ["train-clean-100", "dev-clean"])
    rows = list(csv.DictReader(open(written[0])))
    assert len(rows) == 4 and rows[0]["ID"] == "19-121-0000"
    assert rows[1]["duration"] == "1.000" and rows[1]["spk_id"] == "19"
    assert rows[0]["wav"] == "$data_root/train-clean-100/19/121/19-121-0000.flac"
    assert rows[0]["wrd"] == "HELLO WORLD NUMBER 0"
    dataset = dataset_from_manifest(written[1], root, tmp_path)
    with dataset.output_keys_as(["wav"]):
        assert load_audio(dataset[0]["wav"], SR).shape == (SR // 2,)
    with pytest.raises(FileNotFoundError, match="test-other"):
        prepare_librispeech(root, tmp_path / "csv", ["test-other"])


def test_noise_manifest(tmp_path):
    write(tmp_path / "n1.wav", np.zeros(SR))
    rows = list(csv.DictReader(open(prepare_noise(tmp_path, tmp_path / "noise.csv"))))
    assert rows[0]["duration"] == "1.000" and rows[0]["wav"].endswith("n1.wav")
