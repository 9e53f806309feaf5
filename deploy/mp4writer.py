"""Incremental mp4 writer (H.264 video + AAC audio via PyAV) for streamed chunks.

`Mp4Writer` takes frames and PCM as they arrive (chunk by chunk) and writes a playable mp4
atomically: to a temporary name beside the target, renamed on `close()`. It holds no network or
model code; reading mp4s back for training is data/'s business, not this file's.
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np


class Mp4Writer:
    """Write uint8 frames [F, H, W, 3] and float32 audio [C, S] to `path` as H.264 + AAC."""

    def __init__(self, path: str | os.PathLike, fps: float, sample_rate: int, channels: int):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self._fps = Fraction(fps).limit_denominator(1001)
        self._rate, self._channels = int(sample_rate), int(channels)
        self._box = av.open(str(self._tmp), mode="w", format="mp4")
        self._video: av.VideoStream | None = None  # opened on the first frame (size known then)
        self._audio = self._box.add_stream("aac", rate=self._rate)
        self._audio.layout = "mono" if channels == 1 else "stereo"
        # AAC wants whole 1024-sample frames; the fifo re-blocks the 40 ms prefix + 1 s chunks.
        self._fifo = av.AudioFifo()
        self._n_video = 0
        self._n_audio = 0
        self._closed = False

    def _open_video(self, height: int, width: int) -> av.VideoStream:
        stream = self._box.add_stream("libx264", rate=self._fps)
        # yuv420p needs even sizes; odd ones are padded by one pixel in write().
        stream.width, stream.height = width + width % 2, height + height % 2
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "18"}
        return stream

    def write(self, frames: np.ndarray, audio: np.ndarray) -> None:
        """Append frames uint8 [F, H, W, 3] and audio float32 [C, S] (either may be empty)."""
        frames = np.asarray(frames, dtype=np.uint8)
        audio = np.asarray(audio, dtype=np.float32)
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be [F, H, W, 3] uint8, got {frames.shape}")
        if audio.ndim != 2 or audio.shape[0] != self._channels:
            raise ValueError(f"audio must be [{self._channels}, S] float32, got {audio.shape}")
        for frame in frames:
            if self._video is None:
                self._video = self._open_video(frame.shape[0], frame.shape[1])
            pad_h, pad_w = self._video.height - frame.shape[0], self._video.width - frame.shape[1]
            if pad_h or pad_w:
                frame = np.pad(frame, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            vf.pts = self._n_video
            vf.time_base = 1 / self._fps
            self._n_video += 1
            self._box.mux(self._video.encode(vf))
        if audio.shape[1]:
            af = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(np.clip(audio, -1.0, 1.0)),
                format="fltp",
                layout=self._audio.layout.name,
            )
            af.sample_rate = self._rate
            af.pts = None
            self._fifo.write(af)
            self._drain_audio(final=False)

    def _drain_audio(self, final: bool) -> None:
        size = self._audio.codec_context.frame_size or 1024
        while True:
            frame = self._fifo.read(size)
            if frame is None and final and self._fifo.samples:
                frame = self._fifo.read(self._fifo.samples)
            if frame is None:
                return
            frame.pts = self._n_audio
            frame.time_base = Fraction(1, self._rate)
            self._n_audio += frame.samples
            self._box.mux(self._audio.encode(frame))

    def close(self) -> Path:
        """Flush the encoders, close the container and rename it into place; returns the path."""
        if self._closed:
            return self.path
        self._closed = True
        try:
            self._drain_audio(final=True)
            self._box.mux(self._audio.encode(None))
            if self._video is not None:
                self._box.mux(self._video.encode(None))
            self._box.close()
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        """Drop the partial file (the target path is left untouched)."""
        self._closed = True
        try:
            self._box.close()
        except Exception:  # noqa: BLE001 — best effort on an already failing path
            pass
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def probe(path: str | os.PathLike) -> dict[str, Any]:
    """Frame count, fps, sample rate, channels and durations of an mp4 (decoded, not guessed)."""
    with av.open(str(path)) as box:
        v, a = box.streams.video[0], box.streams.audio[0]
        info: dict[str, float | int] = {
            "fps": float(v.average_rate or v.guessed_rate),
            "width": v.codec_context.width,
            "height": v.codec_context.height,
            "sample_rate": a.codec_context.sample_rate,
            "channels": a.codec_context.channels,
        }
        codecs = (v.codec_context.name, a.codec_context.name)
        info["frames"] = sum(1 for _ in box.decode(v))
    with av.open(str(path)) as box:
        n_samples = sum(f.samples for f in box.decode(box.streams.audio[0]))
    info["video_s"] = info["frames"] / info["fps"]
    info["audio_s"] = n_samples / info["sample_rate"]
    return {**info, "video_codec": codecs[0], "audio_codec": codecs[1]}
