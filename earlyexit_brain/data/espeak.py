"""A minimal ctypes binding to the eSpeak NG library shipped by ``espeakng-loader``.

eSpeak NG is the speech synthesiser behind the built-in synthetic corpus. The
``espeakng-loader`` wheel (PyPI) carries ``libespeak-ng`` and its voice data, so
no system package and no root access are needed. The library keeps global
state, so there is one :class:`ESpeak` per process (worker processes of the
corpus generator each create their own).

Example
-------
>>> tts = ESpeak()  # doctest: +SKIP
>>> wav = tts.synth("hello world", voice="en-us+f3", rate=170, pitch=60)  # doctest: +SKIP
>>> wav.dtype, tts.sample_rate  # doctest: +SKIP
(dtype('int16'), 22050)
"""

import ctypes
import threading

import numpy as np

# speak_lib.h constants
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_ESPEAK_CHARS_UTF8 = 1
_ESPEAK_ENDPAUSE = 0x1000  # without it the end of the last word is cut off
_ESPEAK_INITIALIZE_DONT_EXIT = 0x8000
_PARAMS = {"rate": 1, "volume": 2, "pitch": 3, "range": 4, "wordgap": 7}
_EE_OK = 0

_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

_LOCK = threading.Lock()
_INSTANCE = None


class ESpeakError(RuntimeError):
    """Raised when the eSpeak NG library cannot be loaded or refuses a request."""


class ESpeak:
    """Synchronous eSpeak NG synthesiser returning int16 numpy arrays.

    Use :func:`get_espeak` to share the per-process instance.
    """

    def __init__(self):
        try:
            import espeakng_loader
        except ImportError as err:  # pragma: no cover - install problem
            raise ESpeakError(
                "The synthetic corpus needs the 'espeakng-loader' package "
                "(pip install espeakng-loader); it ships libespeak-ng and its data."
            ) from err
        lib_path = espeakng_loader.get_library_path()
        data_path = espeakng_loader.get_data_path()
        try:
            self._lib = ctypes.CDLL(lib_path)
        except OSError as err:  # pragma: no cover - install problem
            raise ESpeakError(f"Cannot load eSpeak NG library {lib_path}: {err}") from err
        lib = self._lib
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetSynthCallback.argtypes = [_SYNTH_CALLBACK]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_Synchronize.restype = ctypes.c_int
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        # The data path must be the *parent* of espeak-ng-data.
        parent = data_path.rsplit("/espeak-ng-data", 1)[0]
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, parent.encode(), _ESPEAK_INITIALIZE_DONT_EXIT)
        if rate <= 0:
            raise ESpeakError(f"espeak_Initialize failed (data folder {data_path})")
        self.sample_rate = int(rate)
        self._chunks = []

        def _collect(wav, numsamples, events):
            if numsamples > 0:
                self._chunks.append(np.ctypeslib.as_array(wav, shape=(numsamples,)).copy())
            return 0

        self._callback = _SYNTH_CALLBACK(_collect)  # keep a reference alive
        lib.espeak_SetSynthCallback(self._callback)

    def set_random_seed(self, seed: int) -> None:
        """Seed eSpeak NG's own random generator (used by some voice variants)."""
        self._lib.espeak_ng_SetRandSeed(int(seed) % (2**31))

    def synth(self, text, voice="en-us", rate=175, pitch=50, pitch_range=50, wordgap=0):
        """Speak ``text`` and return the waveform as int16 at :attr:`sample_rate`.

        The sentence-final pause is requested (``espeakENDPAUSE``): without it
        eSpeak NG stops before the last word has finished.

        Arguments
        ---------
        text : str
            What to say (plain text; lower case avoids letter-by-letter reading).
        voice : str
            eSpeak voice name, optionally with a variant: ``"en-us+f3"``.
        rate : int
            Speaking rate in words per minute (80-450).
        pitch, pitch_range : int
            Base pitch and pitch range, 0-100.
        wordgap : int
            Extra pause between words, in units of 10 ms.
        """
        lib = self._lib
        with _LOCK:
            if lib.espeak_SetVoiceByName(voice.encode()) != _EE_OK:
                raise ESpeakError(f"eSpeak NG does not know the voice {voice!r}")
            for name, value in (("rate", rate), ("pitch", pitch), ("range", pitch_range), ("wordgap", wordgap)):
                lib.espeak_SetParameter(_PARAMS[name], int(value), 0)
            self._chunks = []
            data = text.encode("utf-8") + b"\0"
            buf = ctypes.create_string_buffer(data)
            err = lib.espeak_Synth(
                buf, len(data), 0, _POS_CHARACTER, 0, _ESPEAK_CHARS_UTF8 | _ESPEAK_ENDPAUSE, None, None
            )
            if err != _EE_OK:
                raise ESpeakError(f"espeak_Synth failed with code {err} for {text!r}")
            lib.espeak_Synchronize()
            chunks, self._chunks = self._chunks, []
        if not chunks:
            return np.zeros(0, dtype=np.int16)
        return np.concatenate(chunks)


def get_espeak():
    """Return this process's :class:`ESpeak` (created on first use)."""
    global _INSTANCE
    with _LOCK:
        if _INSTANCE is None:
            _INSTANCE = ESpeak()
    return _INSTANCE
