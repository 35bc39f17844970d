import Crypto
import Foundation
import JWTKit

/// Where credentials come from: static bearer tokens and JWT verification keys. Loaded from a JSON file by
/// `herald serve --auth FILE`:
///
/// ```json
/// {
///   "tokens": [{"name": "ops", "token": "…", "permissions": {"admin": ["*"], "publish": ["*"], "subscribe": ["*"]}}],
///   "jwt": {
///     "hs256": [{"kid": "k1", "secret": "…"}],
///     "es256": [{"kid": "k2", "publicKeyPEM": "-----BEGIN PUBLIC KEY-----…"}],
///     "eddsa": [{"kid": "k3", "publicKeyBase64URL": "…"}],
///     "issuer": "https://auth.example"
///   }
/// }
/// ```
///
/// A JWT must carry `exp` (and `nbf` when it has one is checked) and a `permissions` claim shaped like a token's
/// `permissions`; `sub` names the caller.
public struct AuthConfiguration: Sendable, Codable {
    public struct StaticToken: Sendable, Codable {
        public var name: String
        public var token: String
        public var permissions: Permissions

        public init(name: String, token: String, permissions: Permissions) {
            self.name = name
            self.token = token
            self.permissions = permissions
        }
    }

    public struct HMACKey: Sendable, Codable {
        public var kid: String
        public var secret: String

        public init(kid: String, secret: String) {
            self.kid = kid
            self.secret = secret
        }
    }

    public struct ECDSAKey: Sendable, Codable {
        public var kid: String
        public var publicKeyPEM: String

        public init(kid: String, publicKeyPEM: String) {
            self.kid = kid
            self.publicKeyPEM = publicKeyPEM
        }
    }

    public struct EdDSAKey: Sendable, Codable {
        public var kid: String
        /// The raw 32-byte Ed25519 public key, base64url (the JWK `x`).
        public var publicKeyBase64URL: String

        public init(kid: String, publicKeyBase64URL: String) {
            self.kid = kid
            self.publicKeyBase64URL = publicKeyBase64URL
        }
    }

    public struct JWTSettings: Sendable, Codable {
        public var hs256: [HMACKey]?
        public var es256: [ECDSAKey]?
        public var eddsa: [EdDSAKey]?
        /// When set, a JWT's `iss` must equal it.
        public var issuer: String?

        public init(hs256: [HMACKey]? = nil, es256: [ECDSAKey]? = nil, eddsa: [EdDSAKey]? = nil, issuer: String? = nil)
        {
            self.hs256 = hs256
            self.es256 = es256
            self.eddsa = eddsa
            self.issuer = issuer
        }
    }

    public var tokens: [StaticToken]?
    public var jwt: JWTSettings?

    public init(tokens: [StaticToken]? = nil, jwt: JWTSettings? = nil) {
        self.tokens = tokens
        self.jwt = jwt
    }

    /// Reads the JSON file; errors name the file and the problem.
    public static func load(file path: String) throws(AuthError) -> AuthConfiguration {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw AuthError(.unauthenticated, "cannot read the auth file \(path)")
        }
        do {
            return try JSONDecoder().decode(AuthConfiguration.self, from: data)
        } catch {
            throw AuthError(.unauthenticated, "the auth file \(path) is not valid: \(error)")
        }
    }
}

/// The claims Herald reads from a JWT.
struct HeraldClaims: JWTPayload {
    var sub: SubjectClaim?
    var exp: ExpirationClaim
    var nbf: NotBeforeClaim?
    var iss: IssuerClaim?
    var permissions: Permissions

    func verify(using algorithm: some JWTAlgorithm) async throws {
        try exp.verifyNotExpired()
        try nbf?.verifyNotBefore()
    }
}

/// Turns a bearer credential into a `Principal`, the same way for every interface (TCP hello, HTTP header).
///
/// Static tokens are compared by SHA-256 digest in constant time against every configured token (no early exit),
/// so timing does not reveal how much of a token was right. Anything shaped like a JWT (three base64url parts)
/// that is not a static token is verified with the configured keys: signature, `exp`, `nbf`, `iss`.
public final class Authenticator: Sendable {
    private let tokens: [(digest: [UInt8], principal: Principal)]
    private let keys: JWTKeyCollection?
    private let issuer: String?

    public init(_ configuration: AuthConfiguration) async throws(AuthError) {
        tokens = (configuration.tokens ?? []).map {
            (Array(SHA256.hash(data: Array($0.token.utf8))), Principal(name: $0.name, permissions: $0.permissions))
        }
        issuer = configuration.jwt?.issuer
        guard let jwt = configuration.jwt,
            !(jwt.hs256 ?? []).isEmpty || !(jwt.es256 ?? []).isEmpty || !(jwt.eddsa ?? []).isEmpty
        else {
            keys = nil
            return
        }
        let keys = JWTKeyCollection()
        do {
            for key in jwt.hs256 ?? [] {
                guard key.secret.utf8.count >= 32 else {
                    throw AuthError(.unauthenticated, "the HS256 key '\(key.kid)' is shorter than 32 bytes")
                }
                await keys.add(
                    hmac: HMACKey(from: key.secret), digestAlgorithm: .sha256, kid: JWKIdentifier(string: key.kid))
            }
            for key in jwt.es256 ?? [] {
                await keys.add(ecdsa: try ES256PublicKey(pem: key.publicKeyPEM), kid: JWKIdentifier(string: key.kid))
            }
            for key in jwt.eddsa ?? [] {
                await keys.add(
                    eddsa: try EdDSA.PublicKey(x: key.publicKeyBase64URL, curve: .ed25519),
                    kid: JWKIdentifier(string: key.kid))
            }
        } catch let error as AuthError {
            throw error
        } catch {
            throw AuthError(.unauthenticated, "a JWT key in the auth configuration is not valid: \(error)")
        }
        self.keys = keys
    }

    /// The principal for an `Authorization` header value (`Bearer <token>`); nil or anything else is refused.
    public func authenticate(authorization header: String?) async throws(AuthError) -> Principal {
        guard let header else {
            throw AuthError(.unauthenticated, "an Authorization: Bearer <token> header is required")
        }
        let parts = header.split(separator: " ", maxSplits: 1)
        guard parts.count == 2, parts[0].lowercased() == "bearer", !parts[1].isEmpty else {
            throw AuthError(.unauthenticated, "the Authorization header must be 'Bearer <token>'")
        }
        return try await authenticate(token: String(parts[1]))
    }

    /// The principal for a bearer token.
    public func authenticate(token: String) async throws(AuthError) -> Principal {
        let digest = Array(SHA256.hash(data: Array(token.utf8)))
        var found: Principal?
        for entry in tokens where Authenticator.constantTimeEqual(entry.digest, digest) && found == nil {
            found = entry.principal
        }
        if let found { return found }
        let segments = token.split(separator: ".", omittingEmptySubsequences: false)
        guard let keys, segments.count == 3, segments.allSatisfy({ !$0.isEmpty }) else {
            throw AuthError(.unauthenticated, "the bearer token is not valid")
        }
        let claims: HeraldClaims
        do {
            claims = try await keys.verify(token, as: HeraldClaims.self, iteratingKeys: true)
        } catch let error as JWTError {
            switch error.errorType {
            case .claimVerificationFailure:
                throw AuthError(.unauthenticated, "the JWT is expired or not yet valid")
            case .signatureVerificationFailed, .unknownKID, .noKeyProvided:
                throw AuthError(.unauthenticated, "the JWT's signature does not verify")
            default:
                throw AuthError(.unauthenticated, "the JWT is malformed")
            }
        } catch {
            throw AuthError(.unauthenticated, "the JWT is malformed")
        }
        if let issuer, claims.iss?.value != issuer {
            throw AuthError(.unauthenticated, "the JWT's issuer is not '\(issuer)'")
        }
        return Principal(name: claims.sub?.value ?? "jwt", permissions: claims.permissions)
    }

    /// Equal-length byte comparison that looks at every byte whatever it finds.
    static func constantTimeEqual(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        guard a.count == b.count else { return false }
        var difference: UInt8 = 0
        for index in a.indices { difference |= a[index] ^ b[index] }
        return difference == 0
    }
}

extension Principal {
    /// Throws `forbidden` unless this principal may do `action` on `topic`.
    public func require(_ action: Action, on topic: String) throws(AuthError) {
        guard permissions.allows(action, on: topic) else {
            throw AuthError(.forbidden, "'\(name)' may not \(action.rawValue) on topic '\(topic)'")
        }
    }

    /// Throws `forbidden` unless this principal has `action` on some topic (listing, metrics).
    public func requireAny(_ action: Action) throws(AuthError) {
        guard !permissions.patterns(for: action).isEmpty else {
            throw AuthError(.forbidden, "'\(name)' has no \(action.rawValue) permission")
        }
    }
}
