//! The `Authorization` check.
//!
//! Harbor sends its webhook policy's "Auth Header" value verbatim and signs nothing; other
//! senders (and our sandbox) sign the body. Accepted forms:
//!
//! | form                         | `token` | `hmac` | `auto` |
//! |------------------------------|---------|--------|--------|
//! | `<secret>`                   | yes     |        | yes    |
//! | `Harbor-Secret <secret>`     | yes     |        | yes    |
//! | `Bearer <secret>`            | yes     |        | yes    |
//! | `Harbor-Secret <hex hmac>`   |         | yes    | yes    |
//! | `sha256=<hex hmac>`          |         | yes    | yes    |
//!
//! where `<hex hmac>` is the hex HMAC-SHA256 of the raw body keyed with the secret.
//!
//! The header is checked before the body is read: a request whose header cannot match (missing,
//! no configured token, not shaped like an HMAC in a mode that accepts HMACs) is refused
//! without its body being read; only an HMAC-shaped header makes the body read and hashed.
//!
//! Timing: a token is compared as SHA-256 digests with `subtle::ConstantTimeEq`, so neither its
//! content nor its length shows in the time taken; an HMAC is compared with `ConstantTimeEq`
//! too. Every configured secret and every candidate token form is checked, with no early exit;
//! what the time can tell is only the header's shape, which the sender chose.

use anyhow::bail;
use clap::ValueEnum;
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};

/// Which `Authorization` forms are accepted.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// Any token or signature form.
    Auto,
    /// `<secret>`, `Harbor-Secret <secret>`, `Bearer <secret>`.
    Token,
    /// `Harbor-Secret <hex hmac>`, `sha256=<hex hmac>`.
    Hmac,
    /// No check at all; must be asked for explicitly.
    None,
}

/// Why a request was refused. Deliberately vague: the answer must not help guess a secret.
#[derive(thiserror::Error, Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    /// No `Authorization` header.
    #[error("missing Authorization header")]
    Missing,
    /// An `Authorization` header that matches no secret in any accepted form.
    #[error("Authorization matches no configured secret")]
    Mismatch,
}

struct Secret {
    key: SecretString,
    digest: [u8; 32],
}

/// Checks requests against the configured secrets.
pub struct Authenticator {
    mode: AuthMode,
    secrets: Vec<Secret>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("mode", &self.mode)
            .field("secrets", &self.secrets.len())
            .finish()
    }
}

impl Authenticator {
    /// Any mode but `none` needs at least one secret.
    pub fn new(mode: AuthMode, secrets: Vec<SecretString>) -> anyhow::Result<Self> {
        if mode != AuthMode::None && secrets.is_empty() {
            bail!(
                "WEBHOOK_SECRET (or WEBHOOK_SECRET_FILE) is required; to accept webhooks \
                 without any check, set WEBHOOK_AUTH_MODE=none explicitly"
            );
        }
        let secrets = secrets
            .into_iter()
            .map(|key| Secret {
                digest: Sha256::digest(key.expose_secret().as_bytes()).into(),
                key,
            })
            .collect();
        Ok(Self { mode, secrets })
    }

    /// The configured mode.
    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    /// How many secrets are accepted.
    pub fn secret_count(&self) -> usize {
        self.secrets.len()
    }

    /// Checks an `Authorization` header value against the raw body.
    pub fn verify(&self, authorization: Option<&[u8]>, body: &[u8]) -> Result<(), AuthError> {
        match self.check_header(authorization)? {
            Verdict::Authorized => Ok(()),
            Verdict::Signed(signature) => self.check_signature(&signature, body),
        }
    }

    /// What the header alone decides, before any body is read: a token matching a secret
    /// authorizes; a header shaped like an HMAC (in a mode accepting them) must be checked
    /// against the body; anything else is refused.
    pub fn check_header(&self, authorization: Option<&[u8]>) -> Result<Verdict, AuthError> {
        if self.mode == AuthMode::None {
            return Ok(Verdict::Authorized);
        }
        let header = authorization.ok_or(AuthError::Missing)?.trim_ascii();
        let harbor_secret = strip_prefix(header, b"Harbor-Secret ").map(<[u8]>::trim_ascii);
        let mut matched = Choice::from(0);

        if matches!(self.mode, AuthMode::Auto | AuthMode::Token) {
            let bearer = strip_prefix(header, b"Bearer ").map(<[u8]>::trim_ascii);
            for candidate in [Some(header), harbor_secret, bearer].into_iter().flatten() {
                let digest: [u8; 32] = Sha256::digest(candidate).into();
                for secret in &self.secrets {
                    matched |= digest.ct_eq(&secret.digest);
                }
            }
        }
        if bool::from(matched) {
            return Ok(Verdict::Authorized);
        }
        if matches!(self.mode, AuthMode::Auto | AuthMode::Hmac) {
            let signature = harbor_secret
                .or_else(|| strip_prefix(header, b"sha256=").map(<[u8]>::trim_ascii))
                .and_then(|hex_signature| {
                    let mut signature = [0u8; 32];
                    hex::decode_to_slice(hex_signature, &mut signature)
                        .ok()
                        .map(|()| signature)
                });
            if let Some(signature) = signature {
                return Ok(Verdict::Signed(signature));
            }
        }
        Err(AuthError::Mismatch)
    }

    /// Checks a signature [`check_header`](Self::check_header) found against the raw body,
    /// with every configured secret.
    pub fn check_signature(&self, signature: &[u8; 32], body: &[u8]) -> Result<(), AuthError> {
        let mut matched = Choice::from(0);
        for secret in &self.secrets {
            matched |= sign(&secret.key, body).ct_eq(signature);
        }
        if bool::from(matched) {
            Ok(())
        } else {
            Err(AuthError::Mismatch)
        }
    }
}

/// What an `Authorization` header decides before the body is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A token matching a configured secret (or no check configured).
    Authorized,
    /// An HMAC, to be checked against the body.
    Signed([u8; 32]),
}

/// The HMAC-SHA256 of `body` keyed with `secret`.
pub fn sign(secret: &SecretString, body: &[u8]) -> [u8; 32] {
    // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.expose_secret().as_bytes()) else {
        return [0; 32];
    };
    mac.update(body);
    mac.finalize().into_bytes().into()
}

/// Strips an ASCII prefix, ignoring case (HTTP auth schemes are case-insensitive).
fn strip_prefix<'a>(value: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    (value.len() >= prefix.len() && value[..prefix.len()].eq_ignore_ascii_case(prefix))
        .then(|| &value[prefix.len()..])
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &[u8] = br#"{"type":"PUSH_ARTIFACT"}"#;

    fn auth(mode: AuthMode, secrets: &[&str]) -> Authenticator {
        let secrets = secrets
            .iter()
            .map(|s| SecretString::from((*s).to_owned()))
            .collect();
        Authenticator::new(mode, secrets).unwrap()
    }

    fn hmac_hex(secret: &str) -> String {
        hex::encode(sign(&SecretString::from(secret.to_owned()), BODY))
    }

    fn check(a: &Authenticator, header: &str) -> Result<(), AuthError> {
        a.verify(Some(header.as_bytes()), BODY)
    }

    #[test]
    fn the_header_alone_refuses_what_cannot_match_and_asks_for_the_body_only_for_an_hmac() {
        let mac = hmac_hex("s3cret");
        let auto = auth(AuthMode::Auto, &["s3cret"]);
        let header = |a: &Authenticator, h: &str| a.check_header(Some(h.as_bytes()));
        assert_eq!(auto.check_header(None), Err(AuthError::Missing));
        assert_eq!(header(&auto, "s3cret"), Ok(Verdict::Authorized));
        assert_eq!(header(&auto, "Bearer s3cret"), Ok(Verdict::Authorized));
        for refused in [
            "wrong",
            "Bearer wrong",
            "Harbor-Secret wrong",
            "sha256=zz",
            "sha256=abcd",
        ] {
            assert_eq!(
                header(&auto, refused),
                Err(AuthError::Mismatch),
                "{refused}"
            );
        }
        assert!(matches!(
            header(&auto, &format!("sha256={mac}")),
            Ok(Verdict::Signed(_))
        ));
        // Shaped like an HMAC is not yet valid: the body decides.
        let Ok(Verdict::Signed(wrong)) = header(&auto, &format!("sha256={}", "ab".repeat(32)))
        else {
            panic!("an HMAC-shaped header must be checked against the body");
        };
        assert_eq!(auto.check_signature(&wrong, BODY), Err(AuthError::Mismatch));
        let token = auth(AuthMode::Token, &["s3cret"]);
        assert_eq!(
            header(&token, &format!("sha256={mac}")),
            Err(AuthError::Mismatch)
        );
        let hmac = auth(AuthMode::Hmac, &["s3cret"]);
        assert_eq!(header(&hmac, "s3cret"), Err(AuthError::Mismatch));
    }

    #[test]
    fn auto_accepts_every_form() {
        let a = auth(AuthMode::Auto, &["s3cret"]);
        let mac = hmac_hex("s3cret");
        for header in [
            "s3cret".to_owned(),
            "Harbor-Secret s3cret".to_owned(),
            "Bearer s3cret".to_owned(),
            format!("Harbor-Secret {mac}"),
            format!("sha256={mac}"),
            format!("sha256={}", mac.to_uppercase()),
            "bearer s3cret".to_owned(),
            " Harbor-Secret  s3cret ".to_owned(),
        ] {
            assert_eq!(check(&a, &header), Ok(()), "{header}");
        }
    }

    #[test]
    fn token_mode_refuses_signatures() {
        let a = auth(AuthMode::Token, &["s3cret"]);
        let mac = hmac_hex("s3cret");
        assert_eq!(check(&a, "s3cret"), Ok(()));
        assert_eq!(check(&a, "Harbor-Secret s3cret"), Ok(()));
        assert_eq!(check(&a, "Bearer s3cret"), Ok(()));
        assert_eq!(
            check(&a, &format!("Harbor-Secret {mac}")),
            Err(AuthError::Mismatch)
        );
        assert_eq!(
            check(&a, &format!("sha256={mac}")),
            Err(AuthError::Mismatch)
        );
    }

    #[test]
    fn hmac_mode_refuses_plain_secrets() {
        let a = auth(AuthMode::Hmac, &["s3cret"]);
        let mac = hmac_hex("s3cret");
        assert_eq!(check(&a, &format!("Harbor-Secret {mac}")), Ok(()));
        assert_eq!(check(&a, &format!("sha256={mac}")), Ok(()));
        assert_eq!(check(&a, "s3cret"), Err(AuthError::Mismatch));
        assert_eq!(check(&a, "Harbor-Secret s3cret"), Err(AuthError::Mismatch));
        assert_eq!(check(&a, "Bearer s3cret"), Err(AuthError::Mismatch));
    }

    #[test]
    fn wrong_secret_wrong_signature_and_missing_header_are_refused() {
        let a = auth(AuthMode::Auto, &["s3cret"]);
        assert_eq!(a.verify(None, BODY), Err(AuthError::Missing));
        assert_eq!(check(&a, "wrong"), Err(AuthError::Mismatch));
        assert_eq!(check(&a, "s3cre"), Err(AuthError::Mismatch));
        assert_eq!(check(&a, "s3cretX"), Err(AuthError::Mismatch));
        assert_eq!(check(&a, ""), Err(AuthError::Mismatch));
        assert_eq!(
            check(&a, &format!("sha256={}", hmac_hex("other"))),
            Err(AuthError::Mismatch)
        );
        assert_eq!(check(&a, "sha256=zz"), Err(AuthError::Mismatch));
        // A signature of another body does not pass.
        let other = hex::encode(sign(&SecretString::from("s3cret".to_owned()), b"{}"));
        assert_eq!(
            check(&a, &format!("sha256={other}")),
            Err(AuthError::Mismatch)
        );
    }

    #[test]
    fn every_rotated_secret_is_accepted() {
        let a = auth(AuthMode::Auto, &["old", "new"]);
        assert_eq!(check(&a, "old"), Ok(()));
        assert_eq!(check(&a, "Bearer new"), Ok(()));
        assert_eq!(check(&a, &format!("sha256={}", hmac_hex("old"))), Ok(()));
        assert_eq!(
            check(&a, &format!("Harbor-Secret {}", hmac_hex("new"))),
            Ok(())
        );
        assert_eq!(check(&a, "older"), Err(AuthError::Mismatch));
    }

    #[test]
    fn none_mode_accepts_anything_and_other_modes_need_a_secret() {
        let a = Authenticator::new(AuthMode::None, vec![]).unwrap();
        assert_eq!(a.verify(None, BODY), Ok(()));
        for mode in [AuthMode::Auto, AuthMode::Token, AuthMode::Hmac] {
            assert!(Authenticator::new(mode, vec![]).is_err());
        }
    }

    #[test]
    fn debug_output_shows_no_secret() {
        let a = auth(AuthMode::Auto, &["s3cret"]);
        assert!(!format!("{a:?}").contains("s3cret"));
    }
}

/// Fuzzing the check with generated headers and bodies (a bounded number of cases, so it runs
/// in CI like any test).
#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;

    fn authenticator() -> Authenticator {
        Authenticator::new(
            AuthMode::Auto,
            vec![SecretString::from("s3cret"), SecretString::from("n3xt")],
        )
        .unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        #[test]
        fn any_header_and_body_is_checked_without_panicking(
            header in proptest::collection::vec(any::<u8>(), 0..300),
            body in proptest::collection::vec(any::<u8>(), 0..2000),
        ) {
            let verdict = authenticator().verify(Some(&header), &body);
            // Random bytes do not guess a secret or a signature.
            let is_secret = ["s3cret", "n3xt"].iter().any(|s| header.trim_ascii().ends_with(s.as_bytes()));
            prop_assert!(verdict.is_err() || is_secret);
        }

        #[test]
        fn a_signature_of_any_body_with_any_secret_is_accepted(
            body in proptest::collection::vec(any::<u8>(), 0..5000),
            secret in "[ -~]{1,64}",
            prefix in prop_oneof![Just("sha256="), Just("Harbor-Secret "), Just("SHA256=")],
        ) {
            let auth = Authenticator::new(AuthMode::Hmac, vec![SecretString::from(secret.clone())]).unwrap();
            let header = format!("{prefix}{}", hex::encode(sign(&SecretString::from(secret), &body)));
            prop_assert_eq!(auth.verify(Some(header.as_bytes()), &body), Ok(()));
        }

        #[test]
        fn changing_one_bit_of_the_body_or_the_signature_is_refused(
            body in proptest::collection::vec(any::<u8>(), 1..2000),
            flip_body in any::<bool>(),
            position in any::<prop::sample::Index>(),
            bit in 0u8..8,
        ) {
            let secret = SecretString::from("s3cret");
            let mut signature = sign(&secret, &body);
            let mut tampered = body.clone();
            if flip_body {
                tampered[position.index(body.len())] ^= 1 << bit;
            } else {
                signature[position.index(32)] ^= 1 << bit;
            }
            let header = format!("sha256={}", hex::encode(signature));
            prop_assert_eq!(authenticator().verify(Some(header.as_bytes()), &tampered), Err(AuthError::Mismatch));
        }
    }
}
