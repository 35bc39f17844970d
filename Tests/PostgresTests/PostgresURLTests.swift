import HeraldPostgres
import Testing

@Suite("PostgreSQL URLs")
struct PostgresURLTests {
    @Test func aFullURLIsRead() throws {
        let url = try #require(PostgresURL("postgresql://app:s%40cret@db.example.com:6432/orders?sslmode=require"))
        #expect(url.username == "app")
        #expect(url.password == "s@cret")
        #expect(url.host == "db.example.com")
        #expect(url.port == 6432)
        #expect(url.database == "orders")
        #expect(url.tlsMode == .require)
        // The password is never printed.
        #expect(url.description == "postgres://app@db.example.com:6432/orders?sslmode=require")
    }

    @Test func defaultsAndIPv6() throws {
        let plain = try #require(PostgresURL("postgres://herald@127.0.0.1/herald"))
        #expect(plain.port == 5432)
        #expect(plain.password == nil)
        #expect(plain.tlsMode == .disable)
        let v6 = try #require(PostgresURL("postgres://herald@[::1]:5433"))
        #expect(v6.host == "::1")
        #expect(v6.port == 5433)
        #expect(v6.database == nil)
    }

    @Test(arguments: [
        "http://user@host/db", "postgres://host:5432/db", "postgres://@host/db", "postgres://u@host:99999/db",
        "postgres://u@host:port/db", "postgres://u@/db", "postgres://u@host/db?sslmode=sometimes",
    ])
    func malformedURLsAreRefused(_ text: String) {
        #expect(PostgresURL(text) == nil)
    }
}
