"""The augmentations' physical effects, their randomness and their argument checks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy.signal import welch

from rfcx_mlops.learn import augment as A
from rfcx_mlops.config import AugmentConfig

SR = 16000


def tone(freq: float, seconds: float = 1.0, sr: int = SR, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * sr)) / sr
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def impulse(n: int) -> np.ndarray:
    """Peak 1 in one sample: out - y is then exactly the noise a transform added."""
    y = np.zeros(n, np.float32)
    y[n // 2] = 1.0
    return y


def peak(x: np.ndarray) -> float:
    return float(np.max(np.abs(x)))


def loglog_slope(x: np.ndarray) -> float:
    """Slope of the Welch power spectrum on log-log axes, fitted over 1/256..1/4 of the sample rate."""
    freqs, power = welch(x.astype(np.float64), fs=1.0, nperseg=4096)
    band = (freqs >= 1 / 256) & (freqs <= 1 / 4)
    return float(np.polyfit(np.log10(freqs[band]), np.log10(power[band]), 1)[0])


def dominant_frequency(y: np.ndarray, sr: int) -> float:
    """The FFT peak of the middle half (away from edge effects), zero-padded to 0.125 Hz bins."""
    mid = y[len(y) // 4 : 3 * len(y) // 4].astype(np.float64)
    n_fft = 8 * sr
    spectrum = np.abs(np.fft.rfft(mid * np.hanning(len(mid)), n=n_fft))
    return float(np.argmax(spectrum) * sr / n_fft)


# -- noise -------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [A.GaussianNoiseSNR, A.PinkNoiseSNR])
@pytest.mark.parametrize("seed", range(5))
def test_noise_reaches_the_drawn_peak_snr(cls, seed):
    y = tone(440.0) + 0.1 * np.random.default_rng(100 + seed).standard_normal(SR).astype(np.float32)
    out, params = cls(min_snr_db=5, max_snr_db=20)(y, np.random.default_rng(seed))
    assert out.dtype == np.float32 and out.shape == y.shape
    assert 5 <= params["snr_db"] <= 20
    achieved = 20 * np.log10(peak(y) / peak(out - y))
    assert achieved == pytest.approx(params["snr_db"], abs=0.5)


@pytest.mark.parametrize("cls, slope", [(A.PinkNoiseSNR, -1.0), (A.GaussianNoiseSNR, 0.0)])
def test_noise_spectrum_slope(cls, slope):
    y = impulse(2**18)
    out, _ = cls(min_snr_db=0, max_snr_db=0)(y, np.random.default_rng(7))
    noise = out - y
    noise[len(y) // 2] = 0.0  # the impulse's sample also holds a little noise; drop it
    assert loglog_slope(noise) == pytest.approx(slope, abs=0.15)


@pytest.mark.parametrize("cls", [A.GaussianNoiseSNR, A.PinkNoiseSNR])
def test_noise_leaves_silence_silent(cls):
    y = np.zeros(1000, np.float32)
    out, params = cls()(y, np.random.default_rng(0))
    assert params and np.array_equal(out, y)


def test_noise_is_reproducible_from_params():
    t = A.PinkNoiseSNR()
    y = tone(300.0)
    out, params = t(y, np.random.default_rng(3))
    assert np.array_equal(t.apply(y, params), out)


# -- pitch -------------------------------------------------------------------------------------


@pytest.mark.parametrize("semitones", range(-5, 6))
def test_pitch_shift_moves_a_tone_by_whole_semitones(semitones):
    f0 = 1000.0
    out = A.PitchShift(SR).apply(tone(f0), {"semitones": semitones})
    assert out.dtype == np.float32 and out.shape == (SR,)
    measured = dominant_frequency(out, SR)
    assert 12 * np.log2(measured / f0) == pytest.approx(semitones, abs=0.1)


def test_pitch_shift_draws_the_whole_inclusive_range():
    t = A.PitchShift(SR, max_semitones=5)
    rng = np.random.default_rng(0)
    drawn = {t.randomize_parameters(tone(440.0), rng)["semitones"] for _ in range(500)}
    assert drawn == set(range(-5, 6))


def test_pitch_shift_of_zero_returns_the_input():
    y = tone(440.0)
    assert A.PitchShift(SR).apply(y, {"semitones": 0}) is y


# -- time --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [-37, -1, 0, 1, 37])
def test_time_shift_rolls_and_pads(shift):
    y = np.arange(1, 201, dtype=np.float32)  # no zeros, so padding is visible
    rolled = np.roll(y, shift)
    replace = A.TimeShift(sr=100, padding="replace").apply(y, {"shift_samples": shift})
    zero = A.TimeShift(sr=100, padding="zero").apply(y, {"shift_samples": shift})
    assert np.array_equal(replace, rolled)
    wrapped = np.zeros(len(y), bool)
    if shift > 0:
        wrapped[:shift] = True
    elif shift < 0:
        wrapped[shift:] = True
    assert np.all(zero[wrapped] == 0) and np.array_equal(zero[~wrapped], rolled[~wrapped])
    assert np.all(y == np.arange(1, 201))  # not modified in place
    if shift == 0:
        assert np.array_equal(replace, y) and np.array_equal(zero, y)


@pytest.mark.parametrize("padding", ["replace", "zero"])
def test_time_shift_params_match_the_roll(padding):
    y = np.arange(1, 201, dtype=np.float32)
    t = A.TimeShift(sr=100, max_shift_seconds=0.5, padding=padding)
    for seed in range(10):
        out, params = t(y, np.random.default_rng(seed))
        shift = params["shift_samples"]
        assert -50 <= shift <= 50 and params["shift_seconds"] == pytest.approx(shift / 100)
        assert np.array_equal(out, t.apply(y, params))
        kept = slice(shift, None) if shift >= 0 else slice(None, shift)
        assert np.array_equal(out[kept], np.roll(y, shift)[kept])


def test_time_shift_draws_the_whole_inclusive_range():
    t = A.TimeShift(sr=10, max_shift_seconds=0.2)
    rng = np.random.default_rng(0)
    drawn = {t.randomize_parameters(np.zeros(50, np.float32), rng)["shift_samples"] for _ in range(300)}
    assert drawn == set(range(-2, 3))


# -- volume ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["uniform", "fade", "cosine", "sine"])
def test_volume_envelopes(mode):
    n, db = 1000, 6.0
    out = A.VolumeControl(max_db=10, mode=mode).apply(np.ones(n, np.float32), {"gain_db": db})
    gain_db = 20 * np.log10(out.astype(np.float64))
    t = np.arange(n)
    expected = {
        "uniform": np.full(n, db),
        "fade": db * (1 - t / (n - 1)),
        "cosine": db * np.cos(2 * np.pi * t / n),
        "sine": db * np.sin(2 * np.pi * t / n),
    }[mode]
    np.testing.assert_allclose(gain_db, expected, atol=1e-4)
    # the landmarks, in plain words
    if mode == "fade":
        assert gain_db[0] == pytest.approx(db, abs=1e-4) and gain_db[-1] == pytest.approx(0, abs=1e-4)
    if mode == "cosine":
        assert gain_db[0] == pytest.approx(db, abs=1e-4) and gain_db[n // 2] == pytest.approx(-db, abs=1e-4)
    if mode == "sine":
        assert gain_db[n // 4] == pytest.approx(db, abs=1e-4) and gain_db[3 * n // 4] == pytest.approx(-db, abs=1e-4)


def test_volume_draws_within_the_limit():
    t = A.VolumeControl(max_db=3, mode="uniform")
    for seed in range(20):
        out, params = t(np.ones(10, np.float32), np.random.default_rng(seed))
        assert -3 <= params["gain_db"] <= 3
        np.testing.assert_allclose(out, 10 ** (params["gain_db"] / 20), rtol=1e-6)


# -- probability, randomness -------------------------------------------------------------------


def test_probability_zero_skips_and_one_applies():
    y = tone(440.0, seconds=0.1)
    out, params = A.VolumeControl(p=0.0)(y, np.random.default_rng(0))
    assert out is y and params == {}
    applied = [bool(A.VolumeControl(p=0.5)(y, np.random.default_rng(s))[1]) for s in range(200)]
    assert 70 < sum(applied) < 130


def small_pipeline(**overrides) -> A.Compose:
    cfg = dataclasses.replace(AugmentConfig(), max_shift_seconds=0.5, **overrides)
    return A.from_config(cfg, SR)


def test_same_seed_same_output_different_seed_different():
    y = tone(440.0)
    pipe = small_pipeline()
    out1, params1, spectral1 = pipe.draw(y, np.random.default_rng(1))
    out2, params2, spectral2 = pipe.draw(y, np.random.default_rng(1))
    out3, params3, spectral3 = pipe.draw(y, np.random.default_rng(2))
    assert spectral1 == spectral2 and spectral1 != spectral3
    assert np.array_equal(out1, out2) and params1 == params2
    assert not np.array_equal(out1, out3) and params1 != params3
    assert out1.dtype == np.float32 and out1.shape == y.shape


def test_no_global_rng():
    y = tone(440.0)
    pipe = small_pipeline()
    np.random.seed(0)
    before = np.random.get_state()
    noises = {pipe.draw(y, np.random.default_rng(seed)).params["noise"] for seed in range(6)}
    after = np.random.get_state()
    assert noises == {"gaussian", "pink"}  # every transform ran at least once
    assert np.array_equal(after[1], before[1]) and after[2:] == before[2:]  # global state untouched
    np.random.seed(0)
    out_a = pipe.draw(y, np.random.default_rng(5)).y
    np.random.seed(0)
    out_b = pipe.draw(y, np.random.default_rng(6)).y
    assert not np.array_equal(out_a, out_b)  # the Generator decides, not the global seed
    np.random.seed(123)
    np.random.random(100)
    out_c = pipe.draw(y, np.random.default_rng(5)).y
    assert np.array_equal(out_a, out_c)


def test_a_skipped_stage_does_not_shift_later_draws():
    y = tone(440.0, seconds=0.5)
    with_noise = small_pipeline(noise_p=1.0).draw(y, np.random.default_rng(4)).params
    without_noise = small_pipeline(noise_p=0.0).draw(y, np.random.default_rng(4)).params
    assert "snr_db" in with_noise and "snr_db" not in without_noise
    for key in ("semitones", "shift_samples", "gain_db"):
        assert with_noise[key] == without_noise[key]


def test_one_of_records_its_choice_and_picks_both():
    one_of = A.OneOf([A.GaussianNoiseSNR(), A.PinkNoiseSNR()], label="noise")
    y = tone(440.0, seconds=0.1)
    choices = {one_of(y, np.random.default_rng(s))[1]["noise"] for s in range(20)}
    assert choices == {"gaussian", "pink"}
    assert A.OneOf(one_of.transforms, p=0.0)(y, np.random.default_rng(0)) == (y, {})


def test_compose_suffixes_repeated_keys():
    pipe = A.Compose([A.VolumeControl(max_db=1), A.VolumeControl(max_db=1)])
    out, params = pipe(np.ones(4, np.float32), np.random.default_rng(0))
    assert set(params) == {"gain_db", "gain_db#2"}
    np.testing.assert_allclose(out, 10 ** ((params["gain_db"] + params["gain_db#2"]) / 20), rtol=1e-6)


# -- the spectrogram domain: a typed draw handed to the features ------------------------------


def test_spectrogram_domain_stages_hand_on_their_draw_and_leave_the_waveform():
    y = tone(440.0, seconds=0.2)
    pitch = A.PitchShift(SR, max_semitones=5, domain="spectrogram")
    out, params, spectral = pitch.draw(y, np.random.default_rng(3))
    assert out is y and spectral == A.SpectralDraw(semitones=params["semitones"]) and params["semitones"] != 0
    volume = A.VolumeControl(max_db=6, mode="fade", domain="spectrogram")
    out, params, spectral = volume.draw(y, np.random.default_rng(3))
    assert out is y and spectral == A.SpectralDraw(volume=(("fade", params["gain_db"]),))
    skipped = A.VolumeControl(p=0.0, domain="spectrogram").draw(y, np.random.default_rng(3))
    assert skipped.spectral == A.SpectralDraw() and skipped.params == {}


def test_two_spectral_volume_changes_both_count():
    """Each volume change keeps its envelope; the gains in dB add up, as two waveform gains would."""
    pipe = A.Compose([A.VolumeControl(max_db=6, mode="fade", domain="spectrogram"),
                      A.VolumeControl(max_db=6, mode="sine", domain="spectrogram")])
    n = 1000
    _, params, spectral = pipe.draw(np.ones(n, np.float32), np.random.default_rng(0))
    assert [mode for mode, _ in spectral.volume] == ["fade", "sine"]
    waveform = A.Compose([A.VolumeControl(max_db=6, mode="fade"), A.VolumeControl(max_db=6, mode="sine")])
    out, waveform_params = waveform(np.ones(n, np.float32), np.random.default_rng(0))
    assert waveform_params == params
    np.testing.assert_allclose(spectral.gain_db(np.arange(n), n), 20 * np.log10(out.astype(np.float64)), atol=1e-4)


def test_spectral_draws_add_up_across_stages():
    assert A.SpectralDraw(2, (("sine", 1.0),)) + A.SpectralDraw(-3) == A.SpectralDraw(-1, (("sine", 1.0),))
    frames = A.SpectralDraw(volume=(("uniform", 3.0), ("uniform", -1.0))).frame_gain_db(1024, 256)
    np.testing.assert_allclose(frames, np.full(5, 2.0))  # 1 + 1024 // 256 centred frames


def test_a_pipeline_with_spectral_stages_refuses_to_drop_their_draw():
    pipe = small_pipeline()  # the default domain is the spectrogram
    assert pipe.spectral
    with pytest.raises(ValueError, match="acts on the spectrogram"):
        pipe(tone(440.0, seconds=0.1), np.random.default_rng(0))
    with pytest.raises(ValueError, match="acts on the spectrogram"):
        A.OneOf([A.PitchShift(SR, domain="spectrogram")])(tone(440.0, seconds=0.1), np.random.default_rng(0))
    assert not small_pipeline(domain="waveform").spectral


@pytest.mark.parametrize("mask, field", [(A.TimeMask, "time_masks"), (A.FrequencyMask, "freq_masks")])
def test_spec_augment_masks_are_drawn_within_their_bounds(mask, field):
    y = tone(440.0, seconds=0.1)
    for seed in range(50):
        out, params, spectral = mask(n_masks=3, max_width=0.2).draw(y, np.random.default_rng(seed))
        bands = params[mask.name]
        assert out is y and getattr(spectral, field) == bands and len(bands) == 3
        assert all(0 <= w <= 0.2 and 0 <= s and s + w <= 1.0001 for s, w in bands)
    keep_mels, keep_frames = A.SpectralDraw(time_masks=((0.5, 0.25),), freq_masks=((0.0, 0.5),)).kept(4, 8)
    np.testing.assert_array_equal(keep_frames, [1, 1, 1, 1, 0, 0, 1, 1])
    np.testing.assert_array_equal(keep_mels, [0, 0, 1, 1])


def test_masks_in_the_config_leave_the_other_draws_alone():
    y = tone(440.0, seconds=0.5)
    plain = small_pipeline().draw(y, np.random.default_rng(4))
    masked = small_pipeline(time_mask_p=1.0, freq_mask_p=1.0).draw(y, np.random.default_rng(4))
    np.testing.assert_array_equal(plain.y, masked.y)
    assert {k: v for k, v in masked.params.items() if not k.endswith("_masks")} == plain.params
    assert masked.spectral.time_masks and masked.spectral.freq_masks
    assert (masked.spectral.semitones, masked.spectral.volume) == (plain.spectral.semitones, plain.spectral.volume)


# -- construction ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, argument",
    [
        (lambda: A.GaussianNoiseSNR(p=1.5), "p"),
        (lambda: A.PinkNoiseSNR(p=-0.1), "p"),
        (lambda: A.VolumeControl(p=float("nan")), "p"),
        (lambda: A.GaussianNoiseSNR(min_snr_db=20, max_snr_db=5), "min_snr_db"),
        (lambda: A.PinkNoiseSNR(max_snr_db=float("inf")), "max_snr_db"),
        (lambda: A.GaussianNoiseSNR(min_snr_db="5"), "min_snr_db"),
        (lambda: A.PitchShift(sr=0), "sr"),
        (lambda: A.PitchShift(sr=16000.0), "sr"),
        (lambda: A.PitchShift(SR, max_semitones=-1), "max_semitones"),
        (lambda: A.PitchShift(SR, max_semitones=2.5), "max_semitones"),
        (lambda: A.TimeShift(sr=-1), "sr"),
        (lambda: A.TimeShift(SR, max_shift_seconds=-1.0), "max_shift_seconds"),
        (lambda: A.TimeShift(SR, padding="reflect"), "padding"),
        (lambda: A.VolumeControl(max_db=-3), "max_db"),
        (lambda: A.VolumeControl(mode="square"), "mode"),
        (lambda: A.OneOf([]), "transforms"),
        (lambda: A.OneOf([A.VolumeControl()], p=2), "p"),
        (lambda: A.Compose([A.VolumeControl(), "pitch"]), "transforms"),
        (lambda: A.TimeMask(n_masks=-1), "n_masks"),
        (lambda: A.FrequencyMask(max_width=1.5), "max_width"),
    ],
)
def test_bad_arguments_raise(make, argument):
    with pytest.raises(ValueError, match=argument):
        make()


def test_non_float_or_multichannel_input_is_refused():
    t = A.VolumeControl()
    with pytest.raises(ValueError, match="1-D float"):
        t(np.ones(10, np.int16), np.random.default_rng(0))
    with pytest.raises(ValueError, match="1-D float"):
        t(np.ones((2, 10), np.float32), np.random.default_rng(0))


# -- from_config -------------------------------------------------------------------------------


def test_from_config_builds_the_seed_pipeline():
    pipe = A.from_config(AugmentConfig(), SR)
    noise, pitch, shift, volume = pipe.transforms
    assert isinstance(noise, A.OneOf) and [type(t) for t in noise.transforms] == [A.GaussianNoiseSNR, A.PinkNoiseSNR]
    assert all((t.min_snr_db, t.max_snr_db) == (5.0, 20.0) for t in noise.transforms)
    assert isinstance(pitch, A.PitchShift) and (pitch.sr, pitch.max_semitones) == (SR, 5)
    assert isinstance(shift, A.TimeShift) and (shift.max_shift_seconds, shift.padding) == (4.0, "replace")
    assert isinstance(volume, A.VolumeControl) and (volume.max_db, volume.mode) == (10.0, "sine")
    assert [noise.p, pitch.p, shift.p, volume.p] == [1.0, 1.0, 1.0, 1.0]


def test_from_config_disabled_is_the_identity():
    y = tone(440.0)
    out, params = A.from_config(AugmentConfig(enabled=False), SR)(y, np.random.default_rng(0))
    assert np.array_equal(out, y) and params == {}


def test_an_unknown_volume_envelope_is_refused():
    with pytest.raises(ValueError, match="mode must be one of uniform, fade, cosine, sine; got 'saw'"):
        A.envelope("saw", np.arange(4), 4)
