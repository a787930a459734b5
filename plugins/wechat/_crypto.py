"""Callback signatures and the AES message encryption of the official account platform.

The AES part (AES-256-CBC, PKCS#7 to 32 bytes, ``random(16) | len | xml | appid``) is
wechatpy's :class:`~wechatpy.crypto.PrpCrypto`; the checks around it are ours: signatures
are compared in constant time (and the channel refuses a stale timestamp before anything else)."""

from __future__ import annotations

import base64
import hashlib
import hmac

from wechatpy.crypto import PrpCrypto

from gateway import SignatureError


def signature(token: str, timestamp: str, nonce: str, *more: str) -> str:
    """WeChat's signature: sha1 of the sorted, concatenated strings. With ``more`` =
    (Encrypt,) it is the ``msg_signature`` of an encrypted message."""
    return hashlib.sha1("".join(sorted((token, timestamp, nonce, *more))).encode("utf-8")).hexdigest()


def check_signature(expected_from_request: str | None, token: str, timestamp: str, nonce: str, *more: str,
                    name: str = "signature") -> None:
    """Raise :class:`SignatureError` unless the request's signature is right."""
    if not expected_from_request:
        raise SignatureError(f"missing {name}")
    ours = signature(token, timestamp, nonce, *more)
    if not hmac.compare_digest(ours.encode(), expected_from_request.strip().lower().encode("ascii", "replace")):
        raise SignatureError(f"bad {name}")


class MessageCrypto:
    """Decrypts and encrypts the ``Encrypt`` payload of one official account."""

    def __init__(self, token: str, encoding_aes_key: str, appid: str):
        self.token = token
        self.appid = appid
        self.key = base64.b64decode(encoding_aes_key + "=")
        if len(self.key) != 32:
            raise ValueError("EncodingAESKey must decode to 32 bytes")

    def decrypt(self, encrypt: str, msg_signature: str | None, timestamp: str, nonce: str) -> str:
        """Check ``msg_signature`` over the ciphertext, then decrypt it and check that it
        was meant for our AppID. Any failure is a :class:`SignatureError`."""
        check_signature(msg_signature, self.token, timestamp, nonce, encrypt, name="msg_signature")
        try:
            return PrpCrypto(self.key).decrypt(encrypt, self.appid)
        except Exception as exc:  # wechatpy raises bare errors for bad padding, lengths, UTF-8, appid
            if type(exc).__name__ == "InvalidAppIdException":
                raise SignatureError("encrypted message is for another appid") from None
            raise SignatureError("encrypted message does not decrypt") from None

    def encrypt(self, xml: str, timestamp: str, nonce: str) -> tuple[str, str]:
        """Encrypt ``xml`` as WeChat would: returns (Encrypt, msg_signature)."""
        encrypt = PrpCrypto(self.key).encrypt(xml, self.appid)
        encrypt = encrypt.decode("ascii") if isinstance(encrypt, bytes) else encrypt
        return encrypt, signature(self.token, timestamp, nonce, encrypt)
