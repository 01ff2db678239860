/// Reads every page of a keyset-paged listing.
enum Paging {
    /// The most pages one listing reads: with the protocol's largest page (1,000) that is ten
    /// million items, far beyond a real gateway; it stops a server that never ends a listing.
    static let maximumPages = 10_000
    /// The protocol's largest page.
    static let maximumPageSize = 1000

    /// Calls `page` with each next-page token (empty first) until a page has no next token, or
    /// `limit` items were read (nil: no limit). Returns the items and the token to go on with
    /// (empty when the listing is complete).
    static func collect<Item>(
        limit: Int?,
        page: (_ pageSize: Int, _ token: String) async throws -> (items: [Item], next: String)
    ) async throws -> (items: [Item], next: String) {
        var items: [Item] = []
        var token = ""
        for _ in 0..<maximumPages {
            let remaining = limit.map { $0 - items.count } ?? maximumPageSize
            if remaining <= 0 { break }
            let result = try await page(min(remaining, maximumPageSize), token)
            items += result.items
            guard !result.next.isEmpty, result.next != token else { return (items, "") }
            token = result.next
        }
        return (items, token)
    }
}
