import Herald
import NIOSSL
import PostgresNIO

/// Where a PostgreSQL server is, from a URL: `postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE[?sslmode=MODE]`
/// (`postgresql://` too). `sslmode` is `disable` (the default), `prefer` or `require` (TLS with the system's trust
/// roots).
public struct PostgresURL: Sendable, Hashable, CustomStringConvertible {
    public enum TLSMode: String, Sendable, Hashable {
        case disable, prefer, require
    }

    public var host: String
    public var port: Int
    public var username: String
    public var password: String?
    public var database: String?
    public var tlsMode: TLSMode

    /// Nil when `url` is not a PostgreSQL URL.
    public init?(_ url: String) {
        var rest = Substring(url)
        guard let scheme = ["postgres://", "postgresql://"].first(where: { rest.hasPrefix($0) }) else { return nil }
        rest = rest.dropFirst(scheme.count)
        var query = Substring("")
        if let mark = rest.firstIndex(of: "?") {
            query = rest[rest.index(after: mark)...]
            rest = rest[..<mark]
        }
        var path = Substring("")
        if let slash = rest.firstIndex(of: "/") {
            path = rest[rest.index(after: slash)...]
            rest = rest[..<slash]
        }
        guard let at = rest.lastIndex(of: "@") else { return nil }
        let credentials = rest[..<at]
        let address = rest[rest.index(after: at)...]
        if let colon = credentials.firstIndex(of: ":") {
            guard let user = Self.percentDecoded(credentials[..<colon]),
                let secret = Self.percentDecoded(credentials[credentials.index(after: colon)...])
            else { return nil }
            username = user
            password = secret
        } else {
            guard let user = Self.percentDecoded(credentials) else { return nil }
            username = user
            password = nil
        }
        guard !username.isEmpty else { return nil }
        if address.hasPrefix("["), let close = address.firstIndex(of: "]") {
            host = String(address[address.index(after: address.startIndex)..<close])
            let after = address[address.index(after: close)...]
            guard after.isEmpty || after.hasPrefix(":"), let port = after.isEmpty ? 5432 : Int(after.dropFirst())
            else { return nil }
            self.port = port
        } else if let colon = address.lastIndex(of: ":") {
            host = String(address[..<colon])
            guard let port = Int(address[address.index(after: colon)...]) else { return nil }
            self.port = port
        } else {
            host = String(address)
            port = 5432
        }
        guard !host.isEmpty, (1...65535).contains(port) else { return nil }
        if path.isEmpty {
            database = nil
        } else {
            guard let name = Self.percentDecoded(path) else { return nil }
            database = name
        }
        tlsMode = .disable
        for pair in query.split(separator: "&") {
            let parts = pair.split(separator: "=", maxSplits: 1)
            guard parts.count == 2 else { return nil }
            if parts[0] == "sslmode" {
                guard let mode = TLSMode(rawValue: String(parts[1])) else { return nil }
                tlsMode = mode
            }
        }
    }

    public var description: String {
        "postgres://\(username)@\(host):\(port)/\(database ?? "")"
            + (tlsMode == .disable ? "" : "?sslmode=\(tlsMode.rawValue)")
    }

    /// For a pool of connections (`PostgresClient`).
    public var clientConfiguration: PostgresClient.Configuration {
        let tls: PostgresClient.Configuration.TLS =
            switch tlsMode {
            case .disable: .disable
            case .prefer: .prefer(.makeClientConfiguration())
            case .require: .require(.makeClientConfiguration())
            }
        return PostgresClient.Configuration(
            host: host, port: port, username: username, password: password, database: database, tls: tls)
    }

    /// For one connection of its own (`OutboxRelay` holds its slots' locks on one). Throws if the TLS context
    /// cannot be made.
    public func connectionConfiguration() throws -> PostgresConnection.Configuration {
        let tls: PostgresConnection.Configuration.TLS =
            switch tlsMode {
            case .disable: .disable
            case .prefer: .prefer(try NIOSSLContext(configuration: .makeClientConfiguration()))
            case .require: .require(try NIOSSLContext(configuration: .makeClientConfiguration()))
            }
        return PostgresConnection.Configuration(
            host: host, port: port, username: username, password: password, database: database, tls: tls)
    }

    /// Percent-escapes decoded (one decoder in Herald, the CloudEvents binding's); nil for a broken escape.
    private static func percentDecoded(_ text: Substring) -> String? {
        try? CloudEventHTTPBinding.percentDecode(String(text), attribute: "url")
    }
}
