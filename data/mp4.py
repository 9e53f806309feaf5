"""MP4 (H.264 yuv420p video + AAC audio) encode and decode with PyAV.

Holds: `encode_mp4` (frames + waveform -> mp4 bytes, deterministic settings) and `decode_mp4`
(mp4 bytes -> frames uint8 [F,H,W,3] + audio float32 [C,S] at the model's rate and channel count,
cut/padded to 1 + 8k frames and the matching number of samples), plus `DecodeError` whose `kind`
names the failure for the bad-sample counter.

Deliberately not here: tar/shard handling (data/shards.py), skipping policy (data/reader.py).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import av
import numpy as np
from av.codec.context import Flags

TEMPORAL_FACTOR = 8  # video codec: 1 + 8k frames -> 1 + k latents
AUDIO_LATENTS_PER_S = 25  # audio codec: 25 latents per second, the first latent alone
AAC_FRAME = 1024  # samples per AAC frame


class DecodeError(ValueError):
    """An mp4 that cannot be used; `kind` is the bad-sample category."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class DecodeSpec:
    """What the model expects from a decoded clip."""

    fps: int = 24  # frames per second; a stream at another rate is an error (kind fps_mismatch)
    sample_rate: int = 16000  # audio is resampled to this rate
    channels: int = 1  # 1 = mono, 2 = stereo
    num_frames: int | None = None  # cut/pad to this (must be 1 + 8k); None = largest 1 + 8k <= F


@dataclass
class Decoded:
    frames: np.ndarray  # uint8 [F, H, W, 3]
    audio: np.ndarray  # float32 [C, S]
    fps: float  # the stream's own rate
    source_sample_rate: int  # the audio stream's own rate
    issues: list[str] = field(default_factory=list)  # length fixes that were applied


def samples_for_frames(num_frames: int, fps: int, sample_rate: int) -> int:
    """Audio samples that match 1 + 8k video frames: (F-1)/fps seconds plus one audio latent.

    121 frames at 24 fps, 16 kHz -> 80000 + 640 = 80640 = 5.04 s (126 audio latents).
    """
    return round((num_frames - 1) * sample_rate / fps) + sample_rate // AUDIO_LATENTS_PER_S


def encode_mp4(
    frames: np.ndarray,
    audio: np.ndarray,
    fps: int = 24,
    sample_rate: int = 16000,
    crf: int = 4,
    audio_bitrate: int = 128_000,
) -> bytes:
    """frames uint8 [F,H,W,3], audio float32 [C,S] in [-1,1] -> mp4 bytes (H.264 + AAC).

    Single-threaded x264, no macroblock-tree rate control and bit-exact muxing so that the same
    input gives the same bytes. x264's mbtree is not deterministic on frames this small with its
    SIMD code: 0.1-10 % of repeated encodes of one 32x32 or 64x64 clip came out different (no
    variant in thousands with mbtree off, or with asm off; measured in session 12).
    A low crf keeps 64x64 frames with small objects close to lossless.
    """
    frames = np.ascontiguousarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [F,H,W,3], got {frames.dtype} {frames.shape}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"yuv420p needs even height and width, got {frames.shape[1:3]}")
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 2 or audio.shape[0] not in (1, 2):
        raise ValueError(f"audio must be float32 [C,S] with C in (1,2), got {audio.shape}")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4", options={"fflags": "+bitexact"}) as box:
        video = box.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        video.options = {
            "crf": str(crf),
            "preset": "medium",
            "threads": "1",
            "x264-params": "mbtree=0",
        }
        video.codec_context.flags |= Flags.bitexact
        layout = "mono" if audio.shape[0] == 1 else "stereo"
        sound = box.add_stream("aac", rate=sample_rate, layout=layout)
        sound.bit_rate = audio_bitrate
        sound.codec_context.flags |= Flags.bitexact
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = i
            box.mux(video.encode(frame))
        box.mux(video.encode())
        for start in range(0, audio.shape[1], AAC_FRAME):
            chunk = np.ascontiguousarray(audio[:, start : start + AAC_FRAME])
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=layout)
            frame.sample_rate, frame.pts = sample_rate, start
            box.mux(sound.encode(frame))
        box.mux(sound.encode())
    return buf.getvalue()


def _open(data: bytes) -> av.container.InputContainer:
    # Garbage bytes and a broken mp4 are different kinds: a real mp4 starts with an ftyp box.
    kind = "undecodable_mp4" if data[4:8] == b"ftyp" else "garbage_member"
    try:
        return av.open(io.BytesIO(data), mode="r")
    except (av.FFmpegError, OSError, ValueError) as err:
        raise DecodeError(kind, f"cannot open mp4 ({len(data)} bytes): {err}") from err


def _demux(
    box: av.container.InputContainer, spec: DecodeSpec
) -> tuple[list[np.ndarray], np.ndarray]:
    """One pass over the packets: video frames (uint8 [H,W,3] each), audio float32 [C, S]."""
    vstream, astream = box.streams.video[0], box.streams.audio[0]
    layout = "mono" if spec.channels == 1 else "stereo"
    resampler = av.AudioResampler(format="fltp", layout=layout, rate=spec.sample_rate)
    frames: list[np.ndarray] = []
    parts: list[np.ndarray] = []  # each float32 [C, n]
    for packet in box.demux(vstream, astream):
        for frame in packet.decode():  # a None-data packet flushes its decoder
            if packet.stream is vstream:
                frames.append(frame.to_ndarray(format="rgb24"))
            else:
                parts.extend(out.to_ndarray() for out in resampler.resample(frame))
    parts.extend(out.to_ndarray() for out in resampler.resample(None))
    wave = np.concatenate(parts, axis=1) if parts else np.zeros((spec.channels, 0), np.float32)
    return frames, wave.astype(np.float32, copy=False)


def _fit_length(x: np.ndarray, n: int, axis: int) -> np.ndarray:
    """Cut or zero-pad (video: repeat the last frame) along `axis` to length n."""
    have = x.shape[axis]
    if have >= n:
        return np.take(x, np.arange(n), axis=axis)
    if axis == 0:  # frames: hold the last frame rather than flash to black
        pad = np.repeat(x[-1:], n - have, axis=0)
    else:
        pad = np.zeros(x.shape[:axis] + (n - have,) + x.shape[axis + 1 :], dtype=x.dtype)
    return np.concatenate([x, pad], axis=axis)


def decode_mp4(data: bytes, spec: DecodeSpec | None = None) -> Decoded:
    """mp4 bytes -> Decoded(frames uint8 [F,H,W,3], audio float32 [C,S]); F = 1 + 8k.

    Raises DecodeError with kind garbage_member | undecodable_mp4 | no_audio | fps_mismatch.
    Length differences (a stream a few frames short, audio shorter than video) are fixed by
    cutting/padding and listed in `Decoded.issues`.
    """
    spec = spec or DecodeSpec()
    box = _open(data)
    with box:
        if not box.streams.video:
            raise DecodeError("undecodable_mp4", "mp4 has no video stream")
        if not box.streams.audio:
            raise DecodeError("no_audio", "mp4 has no audio track")
        vstream = box.streams.video[0]
        fps = float(vstream.average_rate or vstream.guessed_rate or 0)
        if abs(fps - spec.fps) > 1e-3:
            raise DecodeError("fps_mismatch", f"video is {fps:g} fps, expected {spec.fps}")
        try:
            source_rate = int(box.streams.audio[0].rate or 0)
            frames, wave = _demux(box, spec)
        except (av.FFmpegError, OSError, ValueError) as err:
            raise DecodeError("undecodable_mp4", f"decoding failed: {err}") from err
    if not frames:
        raise DecodeError("undecodable_mp4", "mp4 has no decodable video frames")
    video = np.stack(frames)  # uint8 [F, H, W, 3]
    target = spec.num_frames
    if target is None:
        target = 1 + TEMPORAL_FACTOR * ((len(video) - 1) // TEMPORAL_FACTOR)
    elif (target - 1) % TEMPORAL_FACTOR:
        raise ValueError(f"num_frames must be 1 + 8k, got {target}")
    issues = []
    if len(video) != target:
        issues.append(f"frames {len(video)} -> {target}")
    n_samples = samples_for_frames(target, spec.fps, spec.sample_rate)
    # AAC pads its last frame: up to two frames of extra tail is normal, not worth reporting.
    if not n_samples <= wave.shape[1] <= n_samples + 2 * AAC_FRAME:
        issues.append(f"audio samples {wave.shape[1]} -> {n_samples}")
    return Decoded(
        frames=_fit_length(video, target, axis=0),
        audio=_fit_length(wave, n_samples, axis=1),
        fps=fps,
        source_sample_rate=source_rate,
        issues=issues,
    )
